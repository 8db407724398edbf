"""Numbers for the admin's data view: what training data exists and how much annotators agree."""

from __future__ import annotations

from itertools import combinations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback.models import Demonstration, ImportedPair, Ranking, RankingTask, Vote
from feedback.pairs import all_pairs


def ranks(order: list[list[int]]) -> dict[int, int]:
    return {cid: i for i, group in enumerate(order) for cid in group}


def kendall_agreement(session: Session) -> tuple[float | None, int]:
    """Mean Kendall's tau-b over annotator pairs on tasks ranked two or more times."""
    from scipy.stats import kendalltau

    by_task: dict[int, list[Ranking]] = {}
    for r in session.scalars(select(Ranking).where(Ranking.skipped.is_(False))):
        by_task.setdefault(r.task_id, []).append(r)
    taus = []
    for rankings in by_task.values():
        for a, b in combinations(rankings, 2):
            ra, rb = ranks(a.order), ranks(b.order)
            ids = sorted(set(ra) & set(rb))
            if len(ids) < 2:
                continue
            tau = kendalltau([ra[i] for i in ids], [rb[i] for i in ids]).statistic
            if tau == tau:  # NaN when one ranking is all ties
                taus.append(float(tau))
    return (sum(taus) / len(taus) if taus else None), len(taus)


def data_counts(session: Session) -> dict:
    pairs = all_pairs(session)
    by_source: dict[str, int] = {}
    for p in pairs:
        by_source[p.source] = by_source.get(p.source, 0) + 1
    tau, n_pairs = kendall_agreement(session)
    count = lambda stmt: session.scalar(stmt) or 0  # noqa: E731
    return {
        "prompts": count(select(func.count(RankingTask.id))),
        "prompts_from_chat": count(select(func.count(RankingTask.id)).where(RankingTask.source == "chat")),
        "rankings": count(select(func.count(Ranking.id)).where(Ranking.skipped.is_(False))),
        "skipped": count(select(func.count(Ranking.id)).where(Ranking.skipped.is_(True))),
        "demonstrations": count(select(func.count(Demonstration.id))),
        "imported_pairs": count(select(func.count(ImportedPair.id))),
        "pairs": len(pairs),
        "pairs_by_source": by_source,
        "votes_up": count(select(func.count(Vote.id)).where(Vote.value > 0)),
        "votes_down": count(select(func.count(Vote.id)).where(Vote.value < 0)),
        "agreement_tau": tau,
        "agreement_pairs": n_pairs,
    }
