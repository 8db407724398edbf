"""Repository functions for ranking tasks, candidates, rankings and demonstrations."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback.models import Candidate, Conversation, Demonstration, Message, Ranking, RankingTask, User
from feedback.repository import NotFoundError, ValidationError, clean_text, storable, thread

FLAG_KINDS = ("unsafe", "false", "off-topic")
LABELS = "ABCDEFGH"


def context_hash(context: list[dict]) -> str:
    norm = [{"role": m["role"], "content": " ".join(m["content"].split()).lower()} for m in context]
    return hashlib.sha256(json.dumps(norm, sort_keys=True).encode()).hexdigest()


def add_task(*, session: Session, context: list[dict], source: str, wanted: int = 1,
             source_message_id: int | None = None, owner_id: int | None = None) -> RankingTask | None:
    """Add a task unless the same context exists already (deduplicated by normalised text)."""
    if not context or context[-1].get("role") != "user" or not str(context[-1].get("content", "")).strip():
        raise ValidationError("A ranking task's context must end with a non-empty user message.")
    digest = context_hash(context)
    if session.scalar(select(RankingTask.id).where(RankingTask.prompt_hash == digest)) is not None:
        return None
    task = RankingTask(context=context, prompt_hash=digest, source=source, wanted=wanted,
                       source_message_id=source_message_id, owner_id=owner_id)
    session.add(task)
    session.flush()
    return task


def chat_prompts_to_sync(*, session: Session, limit: int = 200) -> list[int]:
    """Ids of logged user prompts that passed moderation and were never looked at (opted-out
    users excluded), oldest first."""
    stmt = (select(Message.id).join(Conversation).join(User, User.id == Conversation.owner_id)
            .where(Message.role == "user", Message.moderation == "pass", Message.ranking_state.is_(None),
                   User.opted_out.is_(False)).order_by(Message.id).limit(limit))
    return list(session.scalars(stmt))


def task_from_message(*, session: Session, message_id: int, wanted: int = 1) -> RankingTask | None:
    """Turn one chat prompt (with its thread) into a task; None if the same task exists.
    Raises ValidationError for a prompt that cannot be a task (see ``mark_message_skipped``)."""
    msg = session.get(Message, message_id)
    if msg is None:
        raise NotFoundError(f"Message {message_id} does not exist.")
    context = [{"role": m.role, "content": m.content} for m in thread(session=session, leaf=msg)
               if m.role in ("user", "assistant") and m.moderation != "flagged" and m.status != "blocked"]
    task = add_task(session=session, context=context, source="chat", wanted=wanted, source_message_id=msg.id,
                    owner_id=msg.conversation.owner_id)
    msg.ranking_state = "task" if task else "duplicate"
    session.flush()
    return task


def mark_message_skipped(*, session: Session, message_id: int) -> None:
    """A prompt that could not become a task is not looked at again."""
    msg = session.get(Message, message_id)
    if msg is not None:
        msg.ranking_state = "skipped"
        session.flush()


def tasks_needing_candidates(*, session: Session, k: int, limit: int = 4) -> list[RankingTask]:
    have = (select(Candidate.task_id, func.count(Candidate.id).label("n")).group_by(Candidate.task_id).subquery())
    stmt = (select(RankingTask).outerjoin(have, have.c.task_id == RankingTask.id)
            .where(func.coalesce(have.c.n, 0) < k, RankingTask.skipped_reason.is_(None))
            .order_by(RankingTask.id).limit(limit))
    return list(session.scalars(stmt))


def ready_task_count(*, session: Session, k: int) -> int:
    """Tasks an annotator could open now: k candidates, still wanting rankings, not given up on."""
    have = (select(Candidate.task_id, func.count(Candidate.id).label("n")).group_by(Candidate.task_id).subquery())
    done = _done_counts()
    stmt = (select(func.count(RankingTask.id)).join(have, have.c.task_id == RankingTask.id)
            .outerjoin(done, done.c.task_id == RankingTask.id)
            .where(have.c.n >= k, func.coalesce(done.c.n, 0) < RankingTask.wanted,
                   RankingTask.skipped_reason.is_(None)))
    return session.scalar(stmt) or 0


def mark_task_skipped(*, session: Session, task_id: int, reason: str) -> None:
    """Give up making candidates for a task (it is never served); ``reason`` says why."""
    task = session.get(RankingTask, task_id)
    if task is not None:
        task.skipped_reason = reason[:2000] or "skipped"
        session.flush()


def add_candidate(*, session: Session, task: RankingTask, content: str, model_version: str | None,
                  sampling: dict | None = None, moderation: str | None = None,
                  finish_reason: str | None = None) -> Candidate:
    cand = Candidate(task_id=task.id, content=storable(content), model_version=model_version, sampling=sampling,
                     moderation=moderation, finish_reason=finish_reason)
    session.add(cand)
    session.flush()
    return cand


def _done_counts():
    return (select(Ranking.task_id, func.count(Ranking.id).label("n")).where(Ranking.skipped.is_(False))
            .group_by(Ranking.task_id).subquery())


def next_task(*, session: Session, annotator: User, k: int) -> RankingTask | None:
    """The ready task this annotator has not seen that still wants rankings: the highest
    priority first (app/active_ranking.py), then the oldest."""
    mine = select(Ranking.task_id).where(Ranking.annotator_id == annotator.id)
    have = (select(Candidate.task_id, func.count(Candidate.id).label("n")).group_by(Candidate.task_id).subquery())
    done = _done_counts()
    stmt = (select(RankingTask).join(have, have.c.task_id == RankingTask.id)
            .outerjoin(done, done.c.task_id == RankingTask.id)
            .where(have.c.n >= k, RankingTask.id.not_in(mine), func.coalesce(done.c.n, 0) < RankingTask.wanted,
                   RankingTask.skipped_reason.is_(None))
            # Portable "NULLS LAST": scored tasks first, the highest priority of them first.
            .order_by(RankingTask.priority.is_(None), RankingTask.priority.desc(), RankingTask.id).limit(1))
    return session.scalar(stmt)


def ready_tasks(*, session: Session, k: int, limit: int = 50) -> list[RankingTask]:
    """Tasks with all ``k`` candidates that still want rankings (what the queue may serve next)."""
    have = (select(Candidate.task_id, func.count(Candidate.id).label("n")).group_by(Candidate.task_id).subquery())
    done = _done_counts()
    stmt = (select(RankingTask).join(have, have.c.task_id == RankingTask.id)
            .outerjoin(done, done.c.task_id == RankingTask.id)
            .where(have.c.n >= k, func.coalesce(done.c.n, 0) < RankingTask.wanted,
                   RankingTask.skipped_reason.is_(None))
            .order_by(RankingTask.id).limit(limit))
    return list(session.scalars(stmt))


def set_priority(*, session: Session, task_id: int, priority: float | None, reason: str | None) -> None:
    task = session.get(RankingTask, task_id)
    if task is not None:
        task.priority, task.priority_reason = priority, (reason or None) and reason[:200]
        session.flush()


def open_task_count(*, session: Session, annotator: User, k: int) -> tuple[int, int]:
    """(ready for this annotator, waiting for candidates)."""
    mine = select(Ranking.task_id).where(Ranking.annotator_id == annotator.id)
    have = (select(Candidate.task_id, func.count(Candidate.id).label("n")).group_by(Candidate.task_id).subquery())
    done = _done_counts()
    base = (select(func.count(RankingTask.id)).outerjoin(have, have.c.task_id == RankingTask.id)
            .outerjoin(done, done.c.task_id == RankingTask.id)
            .where(RankingTask.id.not_in(mine), func.coalesce(done.c.n, 0) < RankingTask.wanted,
                   RankingTask.skipped_reason.is_(None)))
    ready = session.scalar(base.where(func.coalesce(have.c.n, 0) >= k)) or 0
    waiting = session.scalar(base.where(func.coalesce(have.c.n, 0) < k)) or 0
    return ready, waiting


def parse_order(spec: str, labels: list[str]) -> list[list[str]]:
    """'B > A = C > D' or 'BACD' -> [['B'], ['A', 'C'], ['D']]: best first, '=' is a tie."""
    spec = (spec or "").upper().replace(" ", "").replace(",", ">")
    if not spec:
        raise ValidationError("Give an order such as 'B > A = C > D' (or just 'BACD').")
    if ">" not in spec and "=" not in spec:
        spec = ">".join(spec)
    groups = [[c for c in part.split("=") if c] for part in spec.split(">") if part]
    flat = [c for g in groups for c in g]
    if sorted(flat) != sorted(labels) or len(set(flat)) != len(flat):
        raise ValidationError(f"Rank every candidate exactly once: {', '.join(labels)} (got '{spec}').")
    return groups


def submit_ranking(*, session: Session, task_id: int, annotator: User, order: list[list[int]] | None = None,
                   flags: dict[int, str] | None = None, demonstration: str | None = None,
                   skipped: bool = False) -> Ranking:
    """Save one annotator's judgement. ``order`` holds tie groups of candidate ids, best first."""
    task = session.get(RankingTask, task_id)
    if task is None:
        raise NotFoundError(f"Ranking task {task_id} does not exist.")
    if session.scalar(select(Ranking.id).where(Ranking.task_id == task_id, Ranking.annotator_id == annotator.id)):
        raise ValidationError("You already answered this task.")
    cand_ids = {c.id for c in task.candidates}
    order = [list(g) for g in (order or [])]
    flags = {int(k): v for k, v in (flags or {}).items()}
    if not skipped:
        flat = [c for g in order for c in g]
        if sorted(flat) != sorted(cand_ids):
            raise ValidationError("The order must contain every candidate of the task exactly once.")
    for cid, kind in flags.items():
        if cid not in cand_ids or kind not in FLAG_KINDS:
            raise ValidationError(f"A flag names a candidate of this task and one of {', '.join(FLAG_KINDS)}.")
    demonstration = clean_text(demonstration) if isinstance(demonstration, str) else None
    if demonstration and len(demonstration) > 8000:
        raise ValidationError("A demonstration is limited to 8000 characters.")
    ranking = Ranking(task_id=task_id, annotator_id=annotator.id, order=order,
                      flags={str(k): v for k, v in flags.items()}, skipped=skipped)
    session.add(ranking)
    if demonstration:
        session.add(Demonstration(task_id=task_id, context=task.context, content=demonstration,
                                  author_id=annotator.id))
    session.flush()
    return ranking


def done_today(*, session: Session, annotator: User) -> int:
    since = datetime.now(timezone.utc) - timedelta(hours=24)
    return session.scalar(select(func.count(Ranking.id)).where(Ranking.annotator_id == annotator.id,
                                                               Ranking.created_at >= since)) or 0
