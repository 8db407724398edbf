"""Moderation backends. Each has ``name`` and ``score(texts) -> [{category: score in 0..1}]``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Rule:
    """A custom rule: a regular expression or a list of words, with the category it flags."""

    category: str
    pattern: str = ""
    words: tuple[str, ...] = ()

    def compile(self) -> re.Pattern:
        if self.words:
            alternatives = "|".join(re.escape(w) for w in self.words)
            return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
        return re.compile(self.pattern, re.IGNORECASE)


DEFAULT_RULES = [
    # Secrets pasted into a chat should not be echoed back or trained on.
    Rule("secret", pattern=r"\b(?:sk-[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----)"),
    Rule("self_harm", pattern=r"\b(?:how (?:do|can) i|best way to) (?:kill|hurt) myself\b"),
]


def load_rules(path: str | Path | None) -> list[Rule]:
    """Rules file: JSON list of {"category", "pattern"} or {"category", "words": [...]}."""
    if not path:
        return list(DEFAULT_RULES)
    try:
        rows = json.loads(Path(path).read_text())
        rules = [Rule(r["category"], r.get("pattern", ""), tuple(r.get("words", ()))) for r in rows]
        for rule in rules:
            rule.compile()
    except (OSError, ValueError, KeyError, TypeError, re.error) as exc:
        raise ValueError(f"Moderation rules file {path} is invalid: {exc}") from exc
    return rules


class RulesBackend:
    name = "rules"

    def __init__(self, rules: list[Rule]):
        self.rules = [(r.category, r.compile()) for r in rules]

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        out = []
        for text in texts:
            scores: dict[str, float] = {}
            for category, regex in self.rules:
                if regex.search(text):
                    scores[category] = 1.0
            out.append(scores)
        return out


class ProfanityBackend:
    """alt-profanity-check: a linear model over toxic comments that ships its weights (offline)."""

    name = "profanity"

    def __init__(self):
        from profanity_check import predict_prob  # imported lazily: loads a pickled model

        self._predict = predict_prob

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        return [{"toxicity": float(p)} for p in self._predict(list(texts))]


class DetoxifyBackend:
    """Detoxify from a local checkpoint (its weights cannot be downloaded on these machines).

    ``checkpoint`` is a Detoxify ``.ckpt`` (a dict with "config" and "state_dict");
    ``config_dir`` a local HF config + tokenizer directory for its architecture.
    """

    name = "detoxify"

    def __init__(self, checkpoint: str, config_dir: str, device: str = "cpu"):
        from detoxify import Detoxify

        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"Detoxify checkpoint {checkpoint} not found")
        self.model = Detoxify(checkpoint=checkpoint, device=device, huggingface_config_path=config_dir)

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        raw = self.model.predict(list(texts))
        rows: list[dict[str, float]] = [{} for _ in texts]
        for category, values in raw.items():
            values = values if isinstance(values, list) else [values]
            for row, value in zip(rows, values):
                row[category] = float(value)
        return rows
