"""Version leaderboard: Bradley-Terry scores from every pairwise judgement between versions.

Signals: A/B picks in the chat (candidate vs baseline; a tie counts half to each; "both bad"
and no pick count nothing) and annotator rankings whose candidates came from different
versions (every ordered pair between tie groups; same-group pairs are ties).

The model: P(i beats j) = 1 / (1 + exp(theta_j - theta_i)), fitted by Newton's method on the
log-likelihood (ties as half a win each way, as Chatbot Arena counts them). Scores are shown
on the Elo scale (400 / ln 10 per unit of theta, 1000 = the anchor version) with 95% intervals
from the inverse Fisher information with the anchor fixed at 0: each interval says how sure we
are of that version's strength *relative to the anchor*. A weak Gaussian prior (``prior``)
keeps a version that won every comparison finite; it is 0 in the hand-worked tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.models import AbTurn, Candidate, Ranking

ELO_PER_UNIT = 400 / math.log(10)


@dataclass(frozen=True)
class Comparison:
    first: str
    second: str
    outcome: float  # 1 = first won, 0 = second won, 0.5 = tie
    source: str  # ab | ranking


@dataclass
class Rating:
    version: str
    score: float  # Elo scale, anchor = 1000
    lo: float
    hi: float
    comparisons: int
    wins: float  # ties count half


def bradley_terry(comparisons: list[Comparison], anchor: str | None = None, prior: float = 0.01,
                  iterations: int = 100) -> list[Rating]:
    """Ratings best first. ``anchor`` (default: the version in most comparisons) scores 1000 exactly."""
    import numpy as np

    names = sorted({c.first for c in comparisons} | {c.second for c in comparisons})
    if not names:
        return []
    counts = {n: 0 for n in names}
    wins = {n: 0.0 for n in names}
    for c in comparisons:
        counts[c.first] += 1
        counts[c.second] += 1
        wins[c.first] += c.outcome
        wins[c.second] += 1 - c.outcome
    anchor = anchor if anchor in counts else max(names, key=lambda n: (counts[n], n))
    index = {n: i for i, n in enumerate(names)}
    free = [n for n in names if n != anchor]  # the anchor is fixed at theta = 0
    pos = {n: k for k, n in enumerate(free)}
    theta = np.zeros(len(names))
    hessian = np.eye(len(free)) * prior
    for _ in range(iterations):
        grad = -prior * theta[[index[n] for n in free]] if free else np.zeros(0)
        hessian = np.eye(len(free)) * prior
        for c in comparisons:
            i, j = index[c.first], index[c.second]
            p = 1 / (1 + math.exp(theta[j] - theta[i]))
            w = p * (1 - p)
            for name, sign in ((c.first, 1), (c.second, -1)):
                if name in pos:
                    grad[pos[name]] += sign * (c.outcome - p)
            for a in (c.first, c.second):
                for b in (c.first, c.second):
                    if a in pos and b in pos:
                        hessian[pos[a], pos[b]] += w if a == b else -w
        if not free:
            break
        step = np.linalg.solve(hessian + 1e-12 * np.eye(len(free)), grad)
        for n in free:
            theta[index[n]] += step[pos[n]]
        if float(np.max(np.abs(step))) < 1e-10:
            break
    cov = np.linalg.pinv(hessian) if free else np.zeros((0, 0))
    out = []
    for n in names:
        t = float(theta[index[n]])
        half = 1.96 * math.sqrt(max(float(cov[pos[n], pos[n]]), 0.0)) if n in pos else 0.0
        out.append(Rating(n, 1000 + ELO_PER_UNIT * t, 1000 + ELO_PER_UNIT * (t - half),
                          1000 + ELO_PER_UNIT * (t + half), counts[n], wins[n]))
    return sorted(out, key=lambda r: -r.score)


def preference_share(turns_or_outcomes: list[float]) -> tuple[float, float, float, int]:
    """(share, lo, hi, n): how often the first side was preferred (ties half), 95% normal interval."""
    n = len(turns_or_outcomes)
    if not n:
        return float("nan"), float("nan"), float("nan"), 0
    share = sum(turns_or_outcomes) / n
    var = sum((x - share) ** 2 for x in turns_or_outcomes) / (n - 1) if n > 1 else 0.25
    half = 1.96 * math.sqrt(var / n)
    return share, max(0.0, share - half), min(1.0, share + half), n


AB_OUTCOME = {"candidate": 1.0, "baseline": 0.0, "tie": 0.5}  # both_bad / none: no comparison


def ab_comparisons(session: Session, trial_id: int | None = None) -> list[Comparison]:
    stmt = select(AbTurn).where(AbTurn.pick.in_(tuple(AB_OUTCOME))).order_by(AbTurn.id)
    if trial_id is not None:
        stmt = stmt.where(AbTurn.trial_id == trial_id)
    return [Comparison(t.candidate_version, t.baseline_version, AB_OUTCOME[t.pick], "ab")
            for t in session.scalars(stmt)]


def ranking_comparisons(session: Session) -> list[Comparison]:
    """Pairs of candidates from different versions within one annotator's ranking."""
    out = []
    for ranking in session.scalars(select(Ranking).where(Ranking.skipped.is_(False)).order_by(Ranking.id)):
        versions = {c.id: c.model_version for c in session.scalars(
            select(Candidate).where(Candidate.task_id == ranking.task_id))}
        groups = [[versions.get(cid) for cid in group if versions.get(cid)] for group in ranking.order or []]
        for gi, group in enumerate(groups):
            for k, a in enumerate(group):
                out.extend(Comparison(a, b, 0.5, "ranking") for b in group[k + 1:] if a != b)
                for worse in groups[gi + 1:]:
                    out.extend(Comparison(a, b, 1.0, "ranking") for b in worse if a != b)
    return out


def leaderboard(session: Session, anchor: str | None = None) -> list[Rating]:
    return bradley_terry(ab_comparisons(session) + ranking_comparisons(session), anchor=anchor)

