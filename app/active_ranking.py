"""Which ranking task next: the Rank tab serves first the tasks whose ranking teaches the
reward model most, measured in ``python -m bench.active_ranking`` (README "Which task next").

The preference head (model/preference_head.py, a Bradley-Terry model on the chat model's hidden
states) is refitted whenever ``refit_every`` new preference pairs exist (rankings, votes, A/B
picks and imports alike). Ready tasks are then served in turns: every other one is the task
whose candidates the head expects to differ most (the spread of their scores: a ranking there
is rarely all ties), the others in arrival order, so the head also sees what it does not
expect. Plain uncertainty sampling (the tasks the head is least sure about first) measured
worse than arrival order: it picks tasks whose candidates all look alike, whose rankings are
mostly ties. With fewer than ``min_pairs`` pairs, with a remote engine (no local weights to
encode with) or after an error, tasks keep arrival order. Each task's header says why it came.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from itertools import zip_longest
from pathlib import Path

import numpy as np

from feedback import annotation_repo, training_repo
from feedback.db import session_scope
from feedback.pairs import all_pairs
from feedback.stats import pair_count
from model.preference_head import fit_preference_head, score_spread

log = logging.getLogger(__name__)


class TaskPrioritizer:
    def __init__(self, service, k: int, min_pairs: int = 10, refit_every: int = 10, max_pairs: int = 600,
                 cache_size: int = 20000):
        self.service, self.k = service, k
        self.min_pairs, self.refit_every, self.max_pairs = min_pairs, refit_every, max_pairs
        self.head = None
        self._fitted_at = -1  # pair count at the last fit
        self._features: OrderedDict[str, np.ndarray] = OrderedDict()  # reply text digest -> features
        self._cache_size = cache_size
        self._encoder = None

    def _encode(self, texts: list[str]) -> np.ndarray:
        if self._encoder is None:
            from model.moderation.learned import EncoderSpec, encoder_for

            with session_scope(self.service.session_factory) as s:
                version = training_repo.active_version(session=s)
                path = version.path if version else ""
            if not Path(path, "config.json").is_file():
                raise FileNotFoundError(f"no local weights to encode replies with ({path or 'no version'})")
            self._encoder = encoder_for(EncoderSpec(model_dir=path))  # shared with the learned moderation head
        keys = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
        todo = [(key, t) for key, t in zip(keys, texts) if key not in self._features]
        if todo:
            for (key, _), vec in zip(todo, self._encoder.encode([t for _, t in todo])):
                self._features[key] = vec
        for key in keys:
            self._features.move_to_end(key)
        while len(self._features) > self._cache_size:
            self._features.popitem(last=False)
        return np.stack([self._features[key] for key in keys])

    def update(self) -> int:
        """Refit if due, then score ready tasks. Returns the tasks scored (0 when inactive)."""
        factory = self.service.session_factory
        with session_scope(factory) as s:
            n_pairs = pair_count(s)  # cached until the data behind it changes
        if n_pairs < self.min_pairs:
            return 0
        refit = self.head is None or n_pairs - self._fitted_at >= self.refit_every
        if refit:
            with session_scope(factory) as s:
                pairs = all_pairs(s)[-self.max_pairs:]
            self.head = fit_preference_head(self._encode([p.chosen for p in pairs]),
                                            self._encode([p.rejected for p in pairs]))
            self._fitted_at = n_pairs
        with session_scope(factory) as s:
            ready = [(t.id, [c.content for c in t.candidates][:self.k], t.priority)
                     for t in annotation_repo.ready_tasks(session=s, k=self.k)]
        if not refit and all(p is not None for _, _, p in ready):
            return 0
        spread = {task_id: score_spread(self.head, self._encode(texts)) for task_id, texts, _ in ready}
        # Odd task ids take arrival order, even ones the spread: served alternately.
        exploit = sorted((t for t in spread if t % 2 == 0), key=lambda t: -spread[t])
        explore = sorted(t for t in spread if t % 2)
        turns = [t for pair in zip_longest(exploit, explore) for t in pair if t is not None]
        fitted = f"the preference model, fitted on {self.head.pairs} pairs,"
        with session_scope(factory) as s:
            for rank, task_id in enumerate(turns):
                reason = (f"{fitted} expects these replies to differ most (spread {spread[task_id]:.2f}): "
                          "ranking them teaches it most") if task_id % 2 == 0 else \
                    f"next in arrival order (every other task, so {fitted} also sees what it does not expect)"
                annotation_repo.set_priority(session=s, task_id=task_id, priority=float(len(turns) - rank),
                                             reason=reason)
        return len(turns)
