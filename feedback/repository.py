"""Small repository functions for chat data. Each takes the session as a keyword argument,
validates its inputs and raises ``ValidationError`` with a message a user can act on."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback.models import ROLES, AuditLog, Conversation, Message, User, Vote, utcnow

VOTE_REASONS = ("wrong", "unhelpful", "unsafe", "rude", "other")



# C0 control characters and DEL, except tab and the line breaks people type. NUL above all:
# PostgreSQL refuses it in text, and a message made only of them must count as empty.
_CONTROL_CHARS = dict.fromkeys([c for c in range(32) if chr(c) not in "\t\n\r"] + [0x7F])


MAX_ID = 2**31 - 1  # the largest id an INTEGER column holds on PostgreSQL


def checked_id(value, what: str = "id") -> int:
    """A row id from a form or request: a whole number in 1..MAX_ID, else ValidationError (a huge
    number would otherwise reach the database driver and fail there)."""
    try:
        number = float(value)
        valid = number.is_integer() and 1 <= number <= MAX_ID
    except (TypeError, ValueError, OverflowError):
        valid = False
    if not valid:
        raise ValidationError(f"{str(what).capitalize()} must be a whole number from 1 to {MAX_ID}, not {value!r:.40}.")
    return int(number)


def checked_text(text, what: str, limit: int) -> str:
    """Free text cleaned (``clean_text``); ValidationError if it is not text, longer than ``limit``
    or not valid Unicode (a lone surrogate, which JSON can carry and no database stores)."""
    if not isinstance(text, str):
        raise ValidationError(f"{what} must be text.")
    text = clean_text(text)
    if len(text) > limit:
        raise ValidationError(f"{what} has {len(text):,} characters; the limit is {limit:,}. "
                              "Shorten it or split it into parts.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{what} contains invalid Unicode (a lone surrogate).") from None
    return text


def storable(text: str) -> str:
    """``text`` without control characters (no trimming): model output can hold a NUL byte token,
    and PostgreSQL refuses NUL in text. Messages and candidates are stored through this; the chat
    streams model output through it too, so what a user saw is what was stored."""
    return text.translate(_CONTROL_CHARS) if isinstance(text, str) else text


def clean_text(text: str) -> str:
    """Drop control characters, then trim. In this order: trimming first would let a text of
    only NULs through an empty check and store it empty. Every free text we store passes here."""
    return text.translate(_CONTROL_CHARS).strip()

class ValidationError(ValueError):
    """Bad input to a repository function; the message says what was wrong."""


class NotFoundError(LookupError):
    """The row asked for does not exist (or belongs to someone else)."""


# users ---------------------------------------------------------------------------------

def get_user(*, session: Session, name: str) -> User | None:
    return session.scalar(select(User).where(User.name == name))


def get_or_create_user(*, session: Session, name: str, role: str = "user") -> User:
    user = get_user(session=session, name=name)
    if user is None:
        if role not in ROLES:
            raise ValidationError(f"role must be one of {', '.join(ROLES)}")
        user = User(name=name, role=role)
        session.add(user)
        session.flush()
    return user


# conversations -------------------------------------------------------------------------

def create_conversation(*, session: Session, owner: User, system_prompt: str = "", title: str = "New chat") -> Conversation:
    conv = Conversation(owner_id=owner.id, system_prompt=system_prompt, title=title[:200])
    session.add(conv)
    session.flush()
    return conv


def get_conversation(*, session: Session, conversation_id: int, owner: User) -> Conversation:
    """A user only ever sees their own conversations."""
    conv = session.get(Conversation, conversation_id)
    if conv is None or conv.owner_id != owner.id:
        raise NotFoundError(f"Conversation {conversation_id} not found.")
    return conv


def list_conversations(*, session: Session, owner: User, limit: int = 50, query: str = "") -> list[Conversation]:
    """Newest first; with ``query``, only those whose title or any message contains it (any case)."""
    stmt = select(Conversation).where(Conversation.owner_id == owner.id)
    if query.strip():
        pattern = "%" + query.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        # A withheld (blocked) reply's original text is for admin review only: never searched.
        in_messages = select(Message.id).where(Message.conversation_id == Conversation.id, Message.status != "blocked",
                                               Message.content.ilike(pattern, escape="\\")).exists()
        stmt = stmt.where(Conversation.title.ilike(pattern, escape="\\") | in_messages)
    stmt = stmt.order_by(Conversation.updated_at.desc(), Conversation.id.desc()).limit(limit)
    return list(session.scalars(stmt))


def delete_conversation(*, session: Session, conversation: Conversation) -> dict[str, int]:
    """Delete a conversation with its messages, votes, moderation events and A/B turns (the
    foreign keys cascade), and the ranking tasks made from its prompts: like "Delete all my
    data", for one conversation."""
    from sqlalchemy import delete

    from feedback.models import RankingTask

    ids = select(Message.id).where(Message.conversation_id == conversation.id)
    counts = {"messages": count_messages(session=session, conversation=conversation),
              "ranking_tasks": session.execute(delete(RankingTask).where(RankingTask.source_message_id.in_(ids)))
              .rowcount}
    session.execute(delete(Conversation).where(Conversation.id == conversation.id))
    session.flush()
    session.expunge(conversation)
    return counts


def count_messages(*, session: Session, conversation: Conversation) -> int:
    return session.scalar(select(func.count(Message.id)).where(Message.conversation_id == conversation.id)) or 0


# messages ------------------------------------------------------------------------------

def add_message(*, session: Session, conversation: Conversation, role: str, content: str,
                parent: Message | None = None, **fields: Any) -> Message:
    if role not in ("system", "user", "assistant"):
        raise ValidationError("role must be system, user or assistant")
    if parent is not None and parent.conversation_id != conversation.id:
        raise ValidationError("parent message belongs to another conversation")
    msg = Message(conversation_id=conversation.id, parent_id=parent.id if parent else None,
                  role=role, content=storable(content), **fields)
    session.add(msg)
    conversation.updated_at = utcnow()
    conversation.shown_leaf_id = None  # the new message ends the thread shown from now on
    session.flush()
    return msg


def get_message(*, session: Session, message_id: int) -> Message:
    msg = session.get(Message, message_id)
    if msg is None:
        raise NotFoundError(f"Message {message_id} does not exist.")
    return msg


def thread(*, session: Session, leaf: Message) -> list[Message]:
    """The path from the root to ``leaf``: what the model saw, siblings excluded."""
    path = [leaf]
    while path[-1].parent_id is not None:
        path.append(session.get(Message, path[-1].parent_id))
    return path[::-1]


def latest_thread(*, session: Session, conversation: Conversation) -> list[Message]:
    """The thread ending at the newest message: after a regenerate, the newest sibling. The reply a
    user did not pick in a side-by-side (A/B) turn is never the thread's end (feedback.trial_repo)."""
    leaf = session.get(Message, conversation.shown_leaf_id) if conversation.shown_leaf_id else None
    if leaf is None or leaf.conversation_id != conversation.id or leaf.status == "unpicked":
        leaf = session.scalar(select(Message).where(Message.conversation_id == conversation.id,
                                                    Message.status != "unpicked")
                              .order_by(Message.id.desc()).limit(1))
    return thread(session=session, leaf=leaf) if leaf else []


def reply_versions(*, session: Session, conversation: Conversation) -> tuple[list[Message], int]:
    """The versions of the shown thread's last reply (it and its regenerated siblings, oldest
    first, never an unpicked A/B reply) and the index of the one shown. ([], -1) without a reply."""
    shown = latest_thread(session=session, conversation=conversation)
    last = next((m for m in reversed(shown) if m.role == "assistant"), None)
    if last is None:
        return [], -1
    versions = [m for m in siblings(session=session, message=last) if m.status != "unpicked"]
    return versions, versions.index(last)


def show_reply_version(*, session: Session, conversation: Conversation, step: int) -> tuple[int, int]:
    """Show the previous (``step`` -1) or next (+1) version of the last reply, with whatever
    followed it. Returns (1-based position, count); ValidationError past either end."""
    if step not in (-1, 1):
        raise ValidationError("Step through reply versions by -1 or +1.")
    versions, shown = reply_versions(session=session, conversation=conversation)
    target = shown + step
    if not versions or not 0 <= target < len(versions):
        raise ValidationError("There is no other version of this reply." if len(versions) < 2 else
                              f"This is already version {shown + 1} of {len(versions)}.")
    leaf = versions[target]
    while (child := session.scalar(select(Message).where(Message.parent_id == leaf.id, Message.status != "unpicked")
                                   .order_by(Message.id.desc()).limit(1))) is not None:
        leaf = child  # the newest continuation of that version
    conversation.shown_leaf_id = leaf.id
    session.flush()
    return target + 1, len(versions)


def siblings(*, session: Session, message: Message) -> list[Message]:
    stmt = select(Message).where(Message.conversation_id == message.conversation_id,
                                 Message.parent_id == message.parent_id, Message.role == message.role)
    return list(session.scalars(stmt.order_by(Message.id)))


# votes ---------------------------------------------------------------------------------

def add_vote(*, session: Session, message_id: int, user: User, value: int,
             reason: str | None = None, comment: str | None = None) -> Vote:
    """Record or change a thumbs vote. One vote per user and message; a new one replaces it."""
    if value not in (-1, 1):
        raise ValidationError(f"A vote is +1 or -1, not {value!r}.")
    if reason is not None and reason not in VOTE_REASONS:
        raise ValidationError(f"reason must be one of {', '.join(VOTE_REASONS)}")
    if comment is not None and len(comment) > 2000:
        raise ValidationError("comment is limited to 2000 characters")
    msg = session.get(Message, message_id)
    if msg is None:
        raise NotFoundError(f"Cannot vote: message {message_id} does not exist.")
    if msg.role != "assistant":
        raise ValidationError("Only assistant replies can be voted on.")
    vote = session.scalar(select(Vote).where(Vote.message_id == message_id, Vote.user_id == user.id))
    if vote is None:
        vote = Vote(message_id=message_id, user_id=user.id, value=value, reason=reason, comment=comment)
        session.add(vote)
    else:
        vote.value, vote.updated_at = value, utcnow()
        vote.reason = reason if reason is not None else vote.reason
        vote.comment = comment if comment is not None else vote.comment
    session.flush()
    return vote


def votes_by_message(*, session: Session, user: User, message_ids: list[int]) -> dict[int, int]:
    """``user``'s vote value on each of ``message_ids`` that has one."""
    if not message_ids:
        return {}
    rows = session.execute(select(Vote.message_id, Vote.value).where(Vote.user_id == user.id,
                                                                     Vote.message_id.in_(message_ids)))
    return {mid: value for mid, value in rows}


def get_vote(*, session: Session, message_id: int, user: User) -> Vote | None:
    return session.scalar(select(Vote).where(Vote.message_id == message_id, Vote.user_id == user.id))


# audit ---------------------------------------------------------------------------------

def audit(*, session: Session, user_name: str | None, action: str, allowed: bool, detail: str = "") -> AuditLog:
    # The detail often quotes what a caller sent: whatever it was, store it as safe text.
    detail = clean_text(str(detail)).encode("utf-8", "replace").decode("utf-8")[:2000]
    row = AuditLog(user_name=user_name, action=action, allowed=allowed, detail=detail)
    session.add(row)
    session.flush()
    return row


def set_role(*, session: Session, name: str, role: str) -> User:
    if role not in ROLES:
        raise ValidationError(f"role must be one of {', '.join(ROLES)}")
    user = get_user(session=session, name=name)
    if user is None:
        raise NotFoundError(f"No user named {name}.")
    user.role = role
    session.flush()
    return user


def list_users(*, session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.name)))


def export_user_data(*, session: Session, user: User) -> dict:
    """Everything we hold about one user, as plain JSON-able data."""
    from feedback.models import AbTurn, Demonstration, Ranking

    convs = []
    for conv in list_conversations(session=session, owner=user, limit=100_000):
        convs.append({"id": conv.id, "title": conv.title, "system_prompt": conv.system_prompt,
                      "created_at": conv.created_at.isoformat(),
                      "messages": [{"id": m.id, "parent_id": m.parent_id, "role": m.role, "content": m.content,
                                    "status": m.status, "model_version": m.model_version,
                                    "created_at": m.created_at.isoformat()} for m in conv.messages]})
    votes = session.scalars(select(Vote).where(Vote.user_id == user.id)).all()
    rankings = session.scalars(select(Ranking).where(Ranking.annotator_id == user.id)).all()
    demos = session.scalars(select(Demonstration).where(Demonstration.author_id == user.id)).all()
    picks = session.scalars(select(AbTurn).where(AbTurn.user_id == user.id).order_by(AbTurn.id)).all()
    return {"user": {"name": user.name, "role": user.role, "opted_out": user.opted_out, "ab_opt_out": user.ab_opt_out,
                     "created_at": user.created_at.isoformat()},
            "conversations": convs,
            "votes": [{"message_id": v.message_id, "value": v.value, "reason": v.reason, "comment": v.comment}
                      for v in votes],
            "rankings": [{"task_id": r.task_id, "order": r.order, "flags": r.flags, "skipped": r.skipped}
                         for r in rankings],
            "demonstrations": [{"task_id": d.task_id, "content": d.content} for d in demos],
            "ab_picks": [{"user_message_id": t.user_message_id, "candidate_message_id": t.candidate_message_id,
                          "baseline_message_id": t.baseline_message_id, "pick": t.pick} for t in picks]}


def delete_user_data(*, session: Session, user: User) -> dict[str, int]:
    """Delete a user's conversations, votes, A/B picks, rankings, demonstrations and chat-derived tasks.
    The account stays (so they can keep using the app); future training exports no longer
    contain any of it."""
    from sqlalchemy import delete

    from feedback.models import AbTurn, Demonstration, Ranking, RankingTask

    counts = {}
    for model, column in ((Vote, Vote.user_id), (AbTurn, AbTurn.user_id), (Ranking, Ranking.annotator_id),
                          (Demonstration, Demonstration.author_id), (RankingTask, RankingTask.owner_id),
                          (Conversation, Conversation.owner_id)):
        counts[model.__tablename__] = session.execute(delete(model).where(column == user.id)).rowcount
    session.flush()
    return counts
