"""One conversion from every kind of judgement to preference pairs.

- rankings: every ordered pair between tie groups (ties give none);
- chat thumbs: sibling replies to the same context with opposite votes (up beats down);
- A/B picks in the chat: the picked side's reply beats the other (ties and "both bad" give none);
- imported pairs: as they came.
Flagged candidates and moderation-flagged replies are never "chosen". Identical pairs
(same prompt, chosen, rejected) are merged with a count. Opted-out users are excluded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.models import AbTurn, Candidate, Conversation, ImportedPair, Message, Ranking, RankingTask, User, Vote
from feedback.repository import thread

CUT_FINISH_REASONS = ("length", "cancelled")  # finish reasons (candidates', messages') of a reply that did not end


def did_not_end(m: Message) -> bool:
    """A chat reply its token budget cut or the user stopped: its finish reason says so (kept when
    an A/B loser's status becomes "unpicked"), or its status is "stopped". A reply stored before
    messages had a finish reason (migration 0009) counts as cut when it has as many new tokens as
    its budget."""
    if m.finish_reason is not None:
        return m.finish_reason in CUT_FINISH_REASONS
    budget = (m.sampling or {}).get("max_new_tokens")
    return m.status == "stopped" or (isinstance(budget, int) and m.completion_tokens is not None
                                     and m.completion_tokens >= budget)


@dataclass
class Pair:
    prompt: list[dict]
    chosen: str
    rejected: str
    source: str
    count: int = 1
    refs: dict[str, list[int]] = field(default_factory=dict)  # which rows produced it
    chosen_cut: bool = False  # the chosen reply did not end by itself (token budget, or stopped)
    rejected_cut: bool = False  # the rejected reply did not end by itself

    @property
    def key(self) -> str:
        return json.dumps([self.prompt, self.chosen, self.rejected], sort_keys=True)


def pairs_from_order(order: list[list[int]], unchoosable: set[int]) -> list[tuple[int, int]]:
    """(chosen, rejected) for every pair in different tie groups, better group first."""
    out = []
    for i, better in enumerate(order):
        for worse in order[i + 1:]:
            for c in better:
                if c in unchoosable:
                    continue
                out.extend((c, r) for r in worse)
    return out


def _opted_out(session: Session) -> set[int]:
    return set(session.scalars(select(User.id).where(User.opted_out.is_(True))))


def ranking_pairs(session: Session) -> list[Pair]:
    out, opted = [], _opted_out(session)
    for ranking in session.scalars(select(Ranking).where(Ranking.skipped.is_(False)).order_by(Ranking.id)):
        task = session.get(RankingTask, ranking.task_id)
        if ranking.annotator_id in opted or (task.owner_id is not None and task.owner_id in opted):
            continue
        cands = {c.id: c for c in task.candidates}
        bad = {int(k) for k in ranking.flags} | {c.id for c in cands.values() if c.moderation == "flagged"}
        for chosen, rejected in pairs_from_order(ranking.order, bad):
            if chosen in cands and rejected in cands and cands[chosen].content != cands[rejected].content:
                out.append(Pair(task.context, cands[chosen].content, cands[rejected].content, "ranking",
                                refs={"rankings": [ranking.id]},
                                chosen_cut=cands[chosen].finish_reason in CUT_FINISH_REASONS,
                                rejected_cut=cands[rejected].finish_reason in CUT_FINISH_REASONS))
    return out


def vote_pairs(session: Session) -> list[Pair]:
    """Up-voted reply beats a down-voted sibling (same parent), per voter."""
    out, opted = [], _opted_out(session)
    stmt = (select(Vote, Message).join(Message, Message.id == Vote.message_id)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(Message.role == "assistant", Message.parent_id.is_not(None)))
    by_parent: dict[tuple[int, int], list[tuple[Vote, Message]]] = {}
    for vote, msg in session.execute(stmt):
        if vote.user_id in opted or msg.conversation.owner_id in opted:
            continue
        by_parent.setdefault((msg.parent_id, vote.user_id), []).append((vote, msg))
    for (parent_id, _), rows in sorted(by_parent.items()):
        ups = [(v, m) for v, m in rows if v.value > 0 and m.moderation != "flagged" and m.status != "blocked"]
        downs = [(v, m) for v, m in rows if v.value < 0]
        if not ups or not downs:
            continue
        context = _context(session, session.get(Message, parent_id))
        for uv, um in ups:
            for dv, dm in downs:
                if um.content != dm.content:
                    out.append(Pair(context, um.content, dm.content, "votes", refs={"votes": [uv.id, dv.id]},
                                    chosen_cut=did_not_end(um), rejected_cut=did_not_end(dm)))
    return out


def _context(session: Session, parent: Message) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in thread(session=session, leaf=parent)
            if m.role in ("user", "assistant") and m.moderation != "flagged" and m.status != "blocked"]


def ab_pairs(session: Session) -> list[Pair]:
    """A side-by-side pick: the picked reply beats the other one, unless either was blocked."""
    out, opted = [], _opted_out(session)
    stmt = select(AbTurn).where(AbTurn.pick.in_(("candidate", "baseline"))).order_by(AbTurn.id)
    for turn in session.scalars(stmt):
        if turn.user_id in opted:
            continue
        cand, base = session.get(Message, turn.candidate_message_id), session.get(Message, turn.baseline_message_id)
        if cand is None or base is None or {cand.status, base.status} & {"blocked", "failed"}:
            continue
        chosen, rejected = (cand, base) if turn.pick == "candidate" else (base, cand)
        if chosen.content != rejected.content:
            out.append(Pair(_context(session, session.get(Message, turn.user_message_id)), chosen.content,
                            rejected.content, "ab", refs={"ab_turns": [turn.id]},
                            chosen_cut=did_not_end(chosen), rejected_cut=did_not_end(rejected)))
    return out


def imported_pairs(session: Session) -> list[Pair]:
    return [Pair(p.prompt, p.chosen, p.rejected, "import", refs={"imported_pairs": [p.id]})
            for p in session.scalars(select(ImportedPair).order_by(ImportedPair.id))]


def merge(pairs: list[Pair]) -> list[Pair]:
    merged: dict[str, Pair] = {}
    for p in pairs:
        if p.key in merged:
            m = merged[p.key]
            m.count += p.count
            m.chosen_cut, m.rejected_cut = m.chosen_cut or p.chosen_cut, m.rejected_cut or p.rejected_cut
            for k, ids in p.refs.items():
                m.refs.setdefault(k, []).extend(ids)
            if p.source not in m.source.split("+"):
                m.source += "+" + p.source
        else:
            merged[p.key] = Pair(p.prompt, p.chosen, p.rejected, p.source, p.count,
                                 {k: list(v) for k, v in p.refs.items()}, p.chosen_cut, p.rejected_cut)
    return list(merged.values())


def all_pairs(session: Session) -> list[Pair]:
    return merge(ranking_pairs(session) + vote_pairs(session) + ab_pairs(session) + imported_pairs(session))
