"""Seed a database with preferences that prefer a property a test can check."""

from __future__ import annotations

import random

from feedback import training_repo
from feedback.db import session_scope
from feedback.models import ImportedPair

TOPICS = ["the sky", "the sea", "a car", "a flower", "a shirt", "a house", "a bird", "a book", "a cup", "a door",
          "a hat", "a lamp", "a boat", "a bike", "a wall", "a kite"]


def seed_preferences(session_factory, model_dir, n: int = 48, random_labels: bool = False, seed: int = 0) -> None:
    """Chosen replies say 'blue', rejected ones 'red' (or a coin flip when ``random_labels``)."""
    rng = random.Random(seed)
    with session_scope(session_factory) as s:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            prompt = [{"role": "user", "content": f"Question {i}: what colour is {topic}?"}]
            good, bad = f"It is blue, like {topic}.", f"It is red, like {topic}."
            if random_labels and rng.random() < 0.5:
                good, bad = bad, good
            s.add(ImportedPair(prompt=prompt, chosen=good, rejected=bad, source="test"))
        training_repo.ensure_base_version(session=s, name="tiny-base", path=str(model_dir))
