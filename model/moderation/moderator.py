"""Combine backends into one verdict (the worst score over active backends) and log it."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = {
    ("in", "*"): "I can't help with that message because it appears to break our content rules. "
                 "Please rephrase it respectfully and I'll be glad to help.",
    ("out", "*"): "I started writing a reply that did not meet our content rules, so I withheld it. "
                  "Please try asking in a different way.",
    ("in", "secret"): "Your message looks like it contains a secret key. I did not process it; "
                      "please remove the key and send again.",
    ("in", "self_harm"): "I'm really sorry you're feeling this way. You don't have to go through it alone: "
                         "please reach out to someone you trust or a local crisis line.",
    ("in", "error"): "I couldn't check your message for safety just now, so I did not process it. Please try again.",
    ("out", "error"): "I couldn't check my reply for safety just now, so I withheld it. Please try again.",
}


@dataclass
class Verdict:
    direction: str
    text: str
    flagged: bool
    category: str | None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # backend -> category -> score
    thresholds: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def backend(self) -> str:
        return ",".join(self.scores) or "none"


class Moderator:
    def __init__(self, backends, default_threshold: float = 0.5, thresholds: dict[str, float] | None = None,
                 templates: dict | None = None):
        self.backends = list(backends)
        self.default_threshold = default_threshold
        self.thresholds = dict(thresholds or {})
        self.templates = dict(DEFAULT_TEMPLATES)
        self.templates.update(templates or {})

    @property
    def backend_names(self) -> list[str]:
        return [b.name for b in self.backends]

    def use_backend(self, backend) -> None:
        """Put ``backend`` in place of the one with its name (or add it): a newly switched-on head.
        A new list is assigned in one step, so a check already running keeps the old one."""
        self.backends = [b for b in self.backends if b.name != backend.name] + [backend]

    def threshold(self, category: str) -> float:
        return self.thresholds.get(category, self.default_threshold)

    def check(self, text: str, direction: str = "in", partial: bool = False) -> Verdict:
        """Fail closed: a backend that raises blocks the text and the error is logged. ``partial``
        (a reply still streaming, checked every few characters) skips backends too slow to run
        that often (``streaming = False``); the complete reply is checked by all of them."""
        scores: dict[str, dict[str, float]] = {}
        try:
            for backend in self.backends:
                if partial and not getattr(backend, "streaming", True):
                    continue
                scores[backend.name] = backend.score([text])[0]
        except Exception as exc:  # any backend failure must block, never pass
            log.exception("moderation backend failed; blocking (fail closed)")
            return Verdict(direction, text, True, "error", scores, {}, error=f"{exc.__class__.__name__}: {exc}")
        worst: dict[str, float] = {}
        for per_backend in scores.values():
            for category, value in per_backend.items():
                worst[category] = max(worst.get(category, 0.0), value)
        over = {c: v for c, v in worst.items() if v >= self.threshold(c)}
        category = max(over, key=lambda c: over[c] - self.threshold(c)) if over else None
        used = {c: self.threshold(c) for c in worst}
        return Verdict(direction, text, bool(over), category, scores, used)

    def template(self, direction: str, category: str | None) -> str:
        return self.templates.get((direction, category or "*")) or self.templates[(direction, "*")]


def parse_thresholds(spec: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        out[name.strip()] = float(value)
    return out


def build_moderator(backends: str = "auto", threshold: float = 0.5, thresholds: str = "", rules_file: str = "",
                    detoxify_checkpoint: str = "", detoxify_config_dir: str = "", data_dir: str = "") -> Moderator:
    """``auto``: rules + Detoxify when its checkpoint is here, else rules + the offline classifier,
    plus the learned head under ``data_dir`` when one was trained (the pinned one, else the newest;
    ``learned`` asks for it explicitly and fails without one). A head that cannot be loaded is an error here, at start-up."""
    from model.moderation.backends import DetoxifyBackend, ProfanityBackend, RulesBackend, load_rules
    from model.moderation.head_store import active_head_dir

    names = [n.strip() for n in backends.split(",") if n.strip()]
    have_detoxify = bool(detoxify_checkpoint) and Path(detoxify_checkpoint).is_file()
    head = active_head_dir(data_dir) if data_dir else None
    if names == ["auto"]:
        names = ["rules", "detoxify" if have_detoxify else "profanity"] + (["learned"] if head else [])
    active = []
    for name in names:
        if name == "rules":
            active.append(RulesBackend(load_rules(rules_file)))
        elif name == "profanity":
            active.append(ProfanityBackend())
        elif name == "detoxify":
            active.append(DetoxifyBackend(detoxify_checkpoint, detoxify_config_dir))
        elif name == "learned":
            from model.moderation.learned import HeadLoadError, LearnedBackend

            if head is None:
                raise HeadLoadError("The learned moderation backend has no trained head: train one "
                                    "(python -m training.moderation_head) or use another backend.")
            active.append(LearnedBackend(head))
        elif name != "none":
            raise ValueError(f"Unknown moderation backend '{name}' (use rules, profanity, detoxify, learned or none)")
    return Moderator(active, threshold, parse_thresholds(thresholds))


# build_moderator's arguments and the CHAT_* variables (app.settings fields of the same names) that set them.
ENV_VARS = {"backends": "CHAT_MODERATION_BACKENDS", "threshold": "CHAT_MODERATION_THRESHOLD",
            "thresholds": "CHAT_MODERATION_THRESHOLDS", "rules_file": "CHAT_MODERATION_RULES_FILE",
            "detoxify_checkpoint": "CHAT_DETOXIFY_CHECKPOINT", "detoxify_config_dir": "CHAT_DETOXIFY_CONFIG_DIR",
            "data_dir": "CHAT_DATA_DIR"}


def moderator_from_env(env: Mapping[str, str] | None = None) -> Moderator:
    """The moderator the CHAT_MODERATION_* / CHAT_DETOXIFY_* variables describe (``os.environ`` by
    default); an unset variable keeps build_moderator's default, the same as the app's setting."""
    env = os.environ if env is None else env
    kwargs: dict = {arg: env[name] for arg, name in ENV_VARS.items() if name in env}
    if "threshold" in kwargs:
        try:
            kwargs["threshold"] = float(kwargs["threshold"])
        except ValueError:
            raise ValueError(f"CHAT_MODERATION_THRESHOLD must be a number, not {kwargs['threshold']!r}") from None
    return build_moderator(**kwargs)
