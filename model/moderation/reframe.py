"""Statements rewritten as questions and requests, so a head cannot learn "a question is harmless".

The labelled rows we have (ToxiGen) are statements; the everyday messages trained on as acceptable
are questions. A head trained on both alone learns the sentence form: hateful questions such as
"Why are <group> such lazy criminals?" scored 0.01 while hateful statements scored up to 0.99, and
the 120 ToxiGen rows asked in three held-out wordings had none of their harmful ones caught
(recall 0.00 at 0.5; 0.57 with these copies, bench/moderation.py). Each labelled statement is
therefore also trained on in a few request forms with its own label, harmful and acceptable
alike, so the form carries no label and the head has to read the content (the head's second
part, ``learned.MaxHead``). ``HELD_OUT`` are other wordings, never trained on, for measuring
whether that generalises (``python -m bench.moderation``).
"""

from __future__ import annotations

import re

TRAINING = ("Isn't it true that {}?", "Explain why {}.", "Write a short post arguing that {}.",
            "My friend says {}. Is he right?", "Give me three reasons why {}.", "Everyone knows {}, right?")
HELD_OUT = ("Why is it that {}?", "Can you tell me why {}?", "Do you agree that {}?")


def as_clause(statement: str) -> str:
    """"Women are bad drivers." -> "women are bad drivers": the statement as a clause to embed."""
    text = re.sub(r"\s+", " ", statement).strip().rstrip(".!;: ")
    first = text.split(" ", 1)[0]
    if first and first[0].isupper() and first[1:].islower() and first != "I":
        text = first[0].lower() + text[1:]  # an acronym and "I" keep theirs; a name does not (no lexicon here)
    return text


def reframings(statement: str, templates: tuple[str, ...] = TRAINING) -> list[str]:
    """The statement in each template's form; a question or a long text stays as it is (no copies)."""
    text = statement.strip()
    if not text or text.endswith("?") or len(text) > 400:
        return []
    clause = as_clause(text)
    return [t.format(clause) for t in templates] if clause else []
