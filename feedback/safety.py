"""Safety demonstrations from what moderation and annotators caught ("make it refuse what our
moderation keeps flagging", issue 18): each is a prompt with a refusal, for the retrain's SFT.

Sources, each confirmed by a person:
- user messages moderation flagged and an admin marked *correct*, or passed and an admin marked
  *missed*: the refusal is the admin-editable input template of the flag's category (or the
  general one);
- ranking tasks where annotators flagged at least half of the candidates *unsafe* and nobody
  wrote an ideal reply (an ideal reply is already a demonstration): the general input template.
Prompts are scrubbed and deduplicated; opted-out users' messages are left out; "error" and
"secret" flags teach nothing about refusing and are skipped.

The other side, ``cleared_prompts``: user messages an admin cleared (flagged and marked *false
positive*, or passed and marked *correct*). They look like what moderation catches and are
fine, which is exactly where a model that learned to refuse over-refuses; safety DPO pairs
them with an answer over a refusal (training/safety_dpo.py). And ``chat_prompts``: what users
ask every day, the opening messages moderation passed and nobody flagged, for the same side and
for choosing the safety-DPO checkpoint by prompts that look like real traffic.
"""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.datasets import scrub
from feedback.models import (Conversation, Demonstration, Message, ModerationEvent, Ranking, RankingTask, User,
                             Vote)
from feedback.moderation_repo import load_templates, reviewed_as

SKIP_CATEGORIES = {"error", "secret"}


def cleared_prompts(session: Session) -> tuple[list[dict], dict]:
    """({"prompt": [user message]} rows, the ids they came from) for input messages an admin
    cleared, oldest first, scrubbed and deduplicated; opted-out users' and any text a review
    also called harmful are left out."""
    opted = set(session.scalars(select(User.id).where(User.opted_out.is_(True))))
    harmful = set(session.scalars(select(ModerationEvent.text_hash).where(reviewed_as(harmful=True))))
    cleared = select(ModerationEvent).where(ModerationEvent.direction == "in",
                                            reviewed_as(harmful=False)).order_by(ModerationEvent.id)
    rows, seen, events = [], set(), []
    for e in session.scalars(cleared):
        text = scrub(e.text)
        if e.user_id in opted or e.text_hash in harmful or not text.strip() or text in seen:
            continue
        seen.add(text)
        rows.append({"prompt": [{"role": "user", "content": text}]})
        events.append(e.id)
    return rows, {"cleared_moderation_events": events}


CHAT_PROMPT_MAX_CHARS = 1000  # everyday questions are short; a pasted document would not fit the answering engine


def chat_prompts(session: Session, limit: int, max_chars: int = CHAT_PROMPT_MAX_CHARS) -> tuple[list[dict], dict]:
    """({"prompt": [user message]} rows, the message ids) for up to ``limit`` of the newest opening
    messages of conversations that input moderation passed, scrubbed,
    deduplicated, at most ``max_chars`` long. Left out, as possibly harmful: any a moderation
    review looked at (those are the caught and cleared sets) or whose text a review called
    harmful elsewhere; any whose reply output moderation flagged, a review looked at, or a user
    voted unsafe; any asked in a ranking task where an annotator flagged a candidate unsafe.
    Also opted-out users' messages, and turns that failed."""
    opted = set(session.scalars(select(User.id).where(User.opted_out.is_(True))))
    reviewed = set(session.scalars(select(ModerationEvent.message_id).where(ModerationEvent.review.is_not(None))))
    harmful = set(session.scalars(select(ModerationEvent.text_hash).where(reviewed_as(harmful=True))))
    doubted_replies = reviewed | set(session.scalars(select(Vote.message_id).where(Vote.reason == "unsafe")))
    doubted = set(session.scalars(select(Message.parent_id).where(
        Message.role == "assistant", (Message.moderation == "flagged") | Message.id.in_(doubted_replies))))
    unsafe_tasks = (session.get(RankingTask, t) for t in _unsafe_flags(session))
    unsafe_texts = {task.context[-1]["content"] for task in unsafe_tasks if task is not None and task.context}
    passed = (select(Message, Conversation.owner_id).join(Conversation)
              .where(Message.role == "user", Message.parent_id.is_(None), Message.moderation == "pass",
                     Message.status != "failed")
              .order_by(Message.id.desc()).execution_options(yield_per=500))
    rows, seen, ids = [], set(), []
    for msg, owner in session.execute(passed):
        if len(rows) >= limit:
            break
        text = scrub(msg.content).strip()
        if owner in opted or msg.id in reviewed or msg.id in doubted or not text or len(text) > max_chars \
                or text in seen or msg.content in unsafe_texts \
                or hashlib.sha256(msg.content.encode()).hexdigest() in harmful:
            continue
        seen.add(text)
        rows.append({"prompt": [{"role": "user", "content": text}]})
        ids.append(msg.id)
    return rows, {"chat_messages": ids}


def _unsafe_flags(session: Session) -> dict[int, set[int]]:
    """{ranking task id: ids of the candidates an annotator flagged unsafe} over every ranking
    that was not skipped."""
    unsafe: dict[int, set[int]] = {}
    for r in session.scalars(select(Ranking).where(Ranking.skipped.is_(False))):
        for cid, kind in (r.flags or {}).items():
            if kind == "unsafe":
                unsafe.setdefault(r.task_id, set()).add(int(cid))
    return unsafe


def _refusal(templates: dict, category: str | None) -> str:
    return templates.get(("in", category or "*")) or templates[("in", "*")]


def safety_rows(session: Session, default_templates: dict) -> tuple[list[dict], dict, dict]:
    """(rows of {"messages": [user, assistant refusal]}, the ids they came from, counts).
    ``default_templates``: the moderator's built-in replies, under the admin's edited ones."""
    templates = {**default_templates, **load_templates(session=session)}
    opted = set(session.scalars(select(User.id).where(User.opted_out.is_(True))))
    rows, seen, events, tasks = [], set(), [], []

    def add(prompt: list[dict], refusal: str) -> bool:
        key = json.dumps(prompt, sort_keys=True)
        if key in seen:
            return False
        seen.add(key)
        rows.append({"messages": prompt + [{"role": "assistant", "content": refusal}]})
        return True

    confirmed = select(ModerationEvent).where(ModerationEvent.direction == "in",
                                              reviewed_as(harmful=True)).order_by(ModerationEvent.id)
    for e in session.scalars(confirmed):
        if e.user_id in opted or (e.category or "") in SKIP_CATEGORIES or not e.text.strip():
            continue
        if add([{"role": "user", "content": scrub(e.text)}], _refusal(templates, e.category)):
            events.append(e.id)
    with_ideal = set(session.scalars(select(Demonstration.task_id).where(Demonstration.task_id.is_not(None))))
    for task_id, flagged in sorted(_unsafe_flags(session).items()):
        task = session.get(RankingTask, task_id)
        total = len(task.candidates) if task else 0
        if task is None or task_id in with_ideal or task.owner_id in opted or not total or len(flagged) * 2 < total:
            continue
        prompt = [{"role": m["role"], "content": scrub(m["content"])} for m in task.context]
        if add(prompt, _refusal(templates, None)):
            tasks.append(task_id)
    refs = {"safety_moderation_events": events, "safety_ranking_tasks": tasks}
    return rows, refs, {"safety": len(rows), "from_moderation": len(events), "from_unsafe_flags": len(tasks)}
