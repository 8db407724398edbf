"""Numbers for the admin's data view: what training data exists and how much annotators agree."""

from __future__ import annotations

import threading
from itertools import combinations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback.models import (AbTurn, Candidate, Conversation, Demonstration, ImportedPair, Message, Ranking,
                             RankingTask, User, Vote)
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


def pairs_fingerprint(session: Session) -> tuple:
    """A few aggregate queries whose answer changes whenever the pairs ``all_pairs`` builds (or the
    annotator agreement) can change: rankings, votes (and their edits), A/B picks, imports,
    opt-outs, moderation flags, deleted conversations."""
    def agg(*cols, where=None):
        stmt = select(*cols)
        return tuple(session.execute(stmt if where is None else stmt.where(where)).one())

    return (agg(func.count(Ranking.id), func.max(Ranking.id)),
            agg(func.count(Vote.id), func.max(Vote.id), func.max(Vote.updated_at), func.sum(Vote.value)),
            agg(func.count(AbTurn.id), func.max(AbTurn.picked_at), where=AbTurn.pick.is_not(None)),
            agg(func.count(ImportedPair.id), func.max(ImportedPair.id)),
            agg(func.count(User.id), where=User.opted_out.is_(True)),
            agg(func.count(Message.id), where=(Message.moderation == "flagged") | (Message.status == "blocked")),
            agg(func.count(Candidate.id), where=Candidate.moderation == "flagged"),
            agg(func.count(Conversation.id)))


# The admin panels poll data_counts every few seconds; building every pair each time kept a core
# busy with thousands of rankings. The summary is rebuilt only when the fingerprint moves.
_summary_lock = threading.Lock()
_summaries: dict[str, tuple[tuple, dict]] = {}


def _pair_summary(session: Session) -> dict:
    bind = session.get_bind()
    key, fingerprint = f"{bind.url}#{id(bind)}", pairs_fingerprint(session)
    with _summary_lock:
        cached = _summaries.get(key)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    by_source: dict[str, int] = {}
    pairs = all_pairs(session)
    for p in pairs:
        by_source[p.source] = by_source.get(p.source, 0) + 1
    tau, n_pairs = kendall_agreement(session)
    summary = {"pairs": len(pairs), "pairs_by_source": by_source, "agreement_tau": tau, "agreement_pairs": n_pairs}
    with _summary_lock:
        _summaries[key] = (fingerprint, summary)
    return summary


def pair_count(session: Session) -> int:
    """Preference pairs from every source (cached like data_counts' summary)."""
    return _pair_summary(session)["pairs"]


def data_counts(session: Session) -> dict:
    summary = _pair_summary(session)
    count = lambda stmt: session.scalar(stmt) or 0  # noqa: E731
    return {
        "prompts": count(select(func.count(RankingTask.id))),
        "prompts_from_chat": count(select(func.count(RankingTask.id)).where(RankingTask.source == "chat")),
        "rankings": count(select(func.count(Ranking.id)).where(Ranking.skipped.is_(False))),
        "skipped": count(select(func.count(Ranking.id)).where(Ranking.skipped.is_(True))),
        "demonstrations": count(select(func.count(Demonstration.id))),
        "imported_pairs": count(select(func.count(ImportedPair.id))),
        "pairs": summary["pairs"],
        "pairs_by_source": dict(summary["pairs_by_source"]),
        "votes_up": count(select(func.count(Vote.id)).where(Vote.value > 0)),
        "votes_down": count(select(func.count(Vote.id)).where(Vote.value < 0)),
        "agreement_tau": summary["agreement_tau"],
        "agreement_pairs": summary["agreement_pairs"],
    }
