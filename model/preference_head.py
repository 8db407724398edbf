"""A small reward model for choosing what annotators rank next: Bradley-Terry on hidden states.

    python -m bench.active_ranking        # how many rankings uncertainty-first order saves

Each reply becomes a feature vector (the chat model's pooled hidden states, the same encoder
as the learned moderation head, ~10 ms a reply); a logistic regression on the differences of
chosen and rejected replies' features is a Bradley-Terry reward model: score(reply) = w . x.
It refits in well under a second from a few hundred pairs, so the ranking queue can follow
every ranking saved, which the full reward model of a retrain (minutes) cannot.

Task scores for the ranking queue (``STRATEGIES``): ``uncertainty`` (one minus the mean pairwise
confidence |2 sigmoid(s_i - s_j) - 1|: 1 = no idea which is better), ``expected-gradient``,
``spread`` (how much the head expects the candidates to differ) and ``committee`` (how much
heads fitted on bootstrap resamples of the pairs disagree about the candidates' order:
query-by-committee, which a head that is unsure because the replies are alike does not fool). Measured by
``python -m bench.active_ranking``: uncertainty first does worse than random order (it picks
tasks whose candidates all look alike: their rankings are mostly ties); the app serves by
spread, every other task in arrival order (app/active_ranking.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np


@dataclass
class PreferenceHead:
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    pairs: int  # training pairs it was fitted on
    committee: np.ndarray | None = None  # weights of heads fitted on bootstrap resamples (members x dim)

    def scores(self, features: np.ndarray) -> np.ndarray:
        return ((np.asarray(features, dtype=np.float64) - self.mean) / self.scale) @ self.weights

    def accuracy(self, better: np.ndarray, worse: np.ndarray) -> float:
        """Share of pairs the head orders as given (a tie counts half)."""
        diff = self.scores(better) - self.scores(worse)
        return float(np.mean((diff > 0) + 0.5 * (diff == 0))) if len(diff) else float("nan")


def _bradley_terry_weights(diff: np.ndarray, c: float) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([diff, -diff])  # each pair both ways round: the model has no side to favour
    y = np.concatenate([np.ones(len(diff)), np.zeros(len(diff))])
    return LogisticRegression(C=c, fit_intercept=False, max_iter=2000).fit(x, y).coef_[0]


def fit_preference_head(better: np.ndarray, worse: np.ndarray, c: float = 0.05, committee: int = 0,
                        seed: int = 0) -> PreferenceHead:
    """Bradley-Terry by logistic regression on standardised feature differences (no intercept:
    only differences between replies carry information). ``better[i]`` was preferred to ``worse[i]``.
    ``committee`` > 0 also fits that many heads on bootstrap resamples of the pairs (seeded)."""
    better, worse = np.asarray(better, dtype=np.float64), np.asarray(worse, dtype=np.float64)
    if len(better) == 0 or better.shape != worse.shape:
        raise ValueError("A preference head needs one or more (better, worse) feature pairs of the same shape.")
    both = np.concatenate([better, worse])
    mean, scale = both.mean(0), both.std(0) + 1e-6
    diff = (better - worse) / scale
    members = None
    if committee > 0:
        rng = np.random.default_rng(seed)
        members = np.stack([_bradley_terry_weights(diff[rng.integers(0, len(diff), len(diff))], c)
                            for _ in range(committee)])
    return PreferenceHead(mean=mean, scale=scale, weights=_bradley_terry_weights(diff, c), pairs=len(better),
                          committee=members)


def uncertainty(scores) -> float:
    """1 - mean pairwise confidence of the candidates' order (see the module docstring)."""
    s = [float(v) for v in scores]
    if len(s) < 2:
        return 0.0
    conf = [abs(2.0 / (1.0 + np.exp(-(a - b))) - 1.0) for a, b in combinations(s, 2)]
    return float(1.0 - np.mean(conf))


def expected_gradient(head: PreferenceHead, features: np.ndarray) -> float:
    """How much ranking these candidates would move the head: the expected length of the
    log-loss gradient over candidate pairs, sum of p(1-p) |z_i - z_j| with p the head's
    probability for the pair and z the standardised features. Near-identical replies (a task
    whose ranking would be all ties) and pairs the head is sure of both count little."""
    z = (np.asarray(features, dtype=np.float64) - head.mean) / head.scale
    s = z @ head.weights
    total = 0.0
    for i, j in combinations(range(len(s)), 2):
        p = 1.0 / (1.0 + np.exp(-(s[i] - s[j])))
        total += p * (1 - p) * float(np.linalg.norm(z[i] - z[j]))
    return total


def score_spread(head: PreferenceHead, features: np.ndarray) -> float:
    """How different the head expects the candidates to be (the spread of their scores)."""
    return float(np.std(head.scores(features)))


def committee_disagreement(head: PreferenceHead, features: np.ndarray) -> float:
    """Mean over candidate pairs of the spread (standard deviation) across the committee's heads
    of P(i beats j). Alike replies get ~0.5 from every head (no disagreement); replies the heads
    order differently score high. Needs a head fitted with ``committee`` > 1."""
    if head.committee is None or len(head.committee) < 2:
        raise ValueError("committee disagreement needs a head fitted with committee >= 2")
    z = (np.asarray(features, dtype=np.float64) - head.mean) / head.scale
    s = z @ head.committee.T  # candidates x members
    spreads = [np.std(1.0 / (1.0 + np.exp(-(s[i] - s[j])))) for i, j in combinations(range(len(s)), 2)]
    return float(np.mean(spreads)) if spreads else 0.0


STRATEGIES = {
    "uncertainty": lambda head, f: uncertainty(head.scores(f)),
    "expected-gradient": expected_gradient,
    "spread": score_spread,
    "committee": committee_disagreement,
}


def task_priority(head: PreferenceHead, features: np.ndarray, strategy: str = "uncertainty") -> float:
    """Higher = rank sooner."""
    return float(STRATEGIES[strategy](head, features))
