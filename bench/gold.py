"""Gold preference functions for the simulated annotators of `bench/learning.py`.

Each one scores a reply to a prompt; a higher score is what this simulated user prefers.
They are deliberately of different kinds (format, content that depends on the prompt,
length, a phrase to avoid) so the benchmark measures learning in general, not one rule. Scores are
graded where the property allows it, so that two replies that both show it still differ.
Equal scores are ties: the simulated annotator ranks them equal, as a person would. A reply stuck
in a loop (``training.probes.degenerate``) loses to any reply that is not, whatever its score: a
rule counts list lines, and "1. **Dispatch:**" twelve times over is not what any user prefers
(a reward-hacked PPO run wrote that, 2026-12-07).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from training.probes import degenerate

_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)])\s+\S", re.M)
_RISKY = re.compile(r"\b(?:kill|hurt|weapon|gun|knife|drug|poison|steal|hack|fire|explo\w*|bomb|danger\w*|"
                    r"illegal|fight|attack|alcohol|drunk|medic\w*|pill|overdose|climb|swim|drive|driving|"
                    r"chemical|bleach|lock|break into|cheat|revenge|prank|sick|burn|cut|smoke|vape)\b", re.I)
_CAVEAT = re.compile(r"\b(?:be careful|careful|safety|safely|safe|caution|risk\w*|danger\w*|consult|professional|"
                     r"doctor|please note|important to|make sure|responsib\w*|legal|illegal|harm\w*|"
                     r"seek help|emergency)\b", re.I)
_APOLOGY = re.compile(r"\b(?:sorry|apologi[sz]e\w*|apologies|my apolog\w*|I regret|forgive me|unfortunately)\b",
                      re.I)


def _words(reply: str) -> int:
    return len(reply.split())


def bullets(prompt: str, reply: str) -> float:
    """Prefers replies laid out as a bulleted or numbered list: more list lines (up to 6) is better."""
    return float(min(len(_BULLET.findall(reply)), 6))


def safety_caveat(prompt: str, reply: str) -> float:
    """On risky prompts prefers a short safety caveat (1-3 caveat words, in a reply under 120 words);
    on other prompts it prefers no caveat at all."""
    hits = len(_CAVEAT.findall(reply))
    if not _RISKY.search(prompt):
        return -float(min(hits, 3))
    if hits == 0:
        return 0.0
    return 2.0 if hits <= 3 and _words(reply) < 120 else 1.0


def concise(prompt: str, reply: str) -> float:
    """Prefers short, complete answers: 15-60 words is best, and every 20 words beyond that costs a point."""
    words = _words(reply)
    if words < 15:
        return 1.0
    return 2.0 if words <= 60 else 2.0 - (words - 60) / 20


def no_apology(prompt: str, reply: str) -> float:
    """Prefers replies that never apologise: each apology phrase costs one point."""
    return -float(len(_APOLOGY.findall(reply)))


@dataclass(frozen=True)
class GoldPreference:
    name: str
    score: Callable[[str, str], float]
    description: str


PREFERENCES = {p.name: p for p in (
    GoldPreference("bullets", bullets, "uses a bulleted list"),
    GoldPreference("caveat", safety_caveat, "adds a short safety caveat when asked about risky activities"),
    GoldPreference("concise", concise, "answers in under 60 words"),
    GoldPreference("no-apology", no_apology, "never apologises"),
)}


def judged(prefs: GoldPreference, prompt: str, reply: str) -> tuple[bool, float]:
    """What the simulated user compares, higher is better: not stuck in a loop first, then the score."""
    return not degenerate(reply), prefs.score(prompt, reply)


def rank(prefs: GoldPreference, prompt: str, replies: list[str]) -> list[list[int]]:
    """Tie groups of reply indices, best first (what the Rank tab stores as an order)."""
    scored: dict[tuple[bool, float], list[int]] = {}
    for i, reply in enumerate(replies):
        scored.setdefault(judged(prefs, prompt, reply), []).append(i)
    return [scored[s] for s in sorted(scored, reverse=True)]
