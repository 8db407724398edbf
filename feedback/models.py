"""SQLAlchemy tables. Only Alembic creates or alters them (see migrations/)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ROLES = ("user", "annotator", "admin")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="user")
    password_hash: Mapped[str | None] = mapped_column(String(255))
    api_key_hash: Mapped[str | None] = mapped_column(String(255))
    # Users who opt out keep chatting, but their data leaves every training export.
    opted_out: Mapped[bool] = mapped_column(Boolean, default=False)
    # Users may turn side-by-side (A/B) turns off for themselves.
    ab_opt_out: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Conversation(Base):
    __tablename__ = "conversations"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    title: Mapped[str] = mapped_column(String(200), default="New chat")
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    # The leaf of the thread shown after the user stepped back to an older reply version (< 1/2);
    # None = the newest message. Any new message clears it (no foreign key: a plain pointer that
    # feedback.repository.latest_thread checks before use).
    shown_leaf_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    messages: Mapped[list["Message"]] = relationship(
        back_populates="conversation", cascade="all, delete-orphan", passive_deletes=True, order_by="Message.id"
    )


class Message(Base):
    """One turn. Regenerated replies are siblings: same parent, both kept."""

    __tablename__ = "messages"
    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text, default="")
    # pending -> complete | stopped | blocked | failed. A crash leaves "pending": marked, not lost.
    status: Mapped[str] = mapped_column(String(16), default="complete")
    # Assistant replies: why generation ended, as the engine and the OpenAI API say it: stop |
    # length (cut at its token budget) | cancelled | content_filter. None before migration 0009.
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    model_version: Mapped[str | None] = mapped_column(String(120))
    sampling: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    served_by: Mapped[str | None] = mapped_column(String(300))  # the remote replica's URL (model/remote.py)
    # None = not checked, "pass", "flagged", "error" (fail closed counts as flagged).
    moderation: Mapped[str | None] = mapped_column(String(16))
    # User prompts only: None = not looked at yet, "task" | "duplicate" | "skipped" (it could not
    # become a ranking task). Every prompt is looked at once, so one bad row cannot stall the sync.
    ranking_state: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    conversation: Mapped[Conversation] = relationship(back_populates="messages")


class Vote(Base):
    __tablename__ = "votes"
    __table_args__ = (UniqueConstraint("message_id", "user_id", name="uq_vote_message_user"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    value: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(String(32))
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class RankingTask(Base):
    """A prompt (with its conversation context) whose candidate replies annotators rank."""

    __tablename__ = "ranking_tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    context: Mapped[list[Any]] = mapped_column(JSON)  # [{"role", "content"}, ...] ending with the user turn
    prompt_hash: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(String(32))  # chat | import
    source_message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"))
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    wanted: Mapped[int] = mapped_column(Integer, default=1)
    # Set when candidates could not be made for it (the error): such a task is not retried.
    skipped_reason: Mapped[str | None] = mapped_column(Text)
    # Where the ranking queue serves it (higher first; None = not scored yet, after the scored
    # ones in arrival order) and why (shown in the Rank tab): app/active_ranking.py.
    priority: Mapped[float | None] = mapped_column(Float)
    priority_reason: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    candidates: Mapped[list["Candidate"]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="Candidate.id"
    )


class Candidate(Base):
    __tablename__ = "candidates"
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("ranking_tasks.id", ondelete="CASCADE"), index=True)
    content: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(String(120))
    sampling: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    moderation: Mapped[str | None] = mapped_column(String(16))
    # "stop" (ended by itself) | "length" (cut at the worker's max_new_tokens) | None (not recorded:
    # older rows). SFT on a cut reply must not teach ending the turn there (training/sft.py).
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Ranking(Base):
    """An annotator's judgement: ``order`` is a list of tie groups of candidate ids, best first."""

    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("task_id", "annotator_id", name="uq_ranking_task_annotator"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("ranking_tasks.id", ondelete="CASCADE"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    order: Mapped[list[Any]] = mapped_column(JSON, default=list)
    flags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # {candidate_id: unsafe|false|off-topic}
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Demonstration(Base):
    __tablename__ = "demonstrations"
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("ranking_tasks.id", ondelete="SET NULL"))
    context: Mapped[list[Any]] = mapped_column(JSON)
    content: Mapped[str] = mapped_column(Text)
    author_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ImportedPair(Base):
    """A preference pair that came from a file (TRL rows or HH-RLHF), not from our users."""

    __tablename__ = "imported_pairs"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt: Mapped[list[Any]] = mapped_column(JSON)
    chosen: Mapped[str] = mapped_column(Text)
    rejected: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModerationEvent(Base):
    __tablename__ = "moderation_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    direction: Mapped[str] = mapped_column(String(8))  # in | out
    text: Mapped[str] = mapped_column(Text)  # kept for review only, never shown to other users
    text_hash: Mapped[str] = mapped_column(String(64), index=True)
    backend: Mapped[str] = mapped_column(String(120))
    scores: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    thresholds: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    decision: Mapped[str] = mapped_column(String(16))  # pass | flag | error
    category: Mapped[str | None] = mapped_column(String(40))
    error: Mapped[str | None] = mapped_column(Text)
    review: Mapped[str | None] = mapped_column(String(16))  # correct | false_positive (flags) | correct | missed (passes)
    reviewed_by: Mapped[str | None] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class DataSnapshot(Base):
    __tablename__ = "data_snapshots"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    rows: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # {"rankings": [ids], "votes": [ids], ...}
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    path: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    path: Mapped[str] = mapped_column(String(500))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    stage: Mapped[str] = mapped_column(String(32), default="base")  # base | sft | pref_dpo | ppo
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    snapshot_id: Mapped[int | None] = mapped_column(ForeignKey("data_snapshots.id", ondelete="SET NULL"))
    training_run_id: Mapped[int | None] = mapped_column(Integer)
    is_active: Mapped[bool] = mapped_column(Boolean, default=False)
    # CHAT_ENGINE=openai: the id the engine servers know this version by (None = CHAT_REMOTE_MODEL,
    # else the version's name). Set in Admin > Training.
    remote_model: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrainingRun(Base):
    __tablename__ = "training_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|done|failed|cancelled|gated
    stage: Mapped[str | None] = mapped_column(String(32))
    step: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    eta_s: Mapped[float | None] = mapped_column(Float)
    history: Mapped[list[Any]] = mapped_column(JSON, default=list)  # [{"stage","step","loss",...}]
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    log_path: Mapped[str | None] = mapped_column(String(500))
    error: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int | None] = mapped_column(Integer)
    base_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    requested_by: Mapped[str | None] = mapped_column(String(80))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class AbTrial(Base):
    """A registered version on trial against the serving one for a share of chat turns."""

    __tablename__ = "ab_trials"
    id: Mapped[int] = mapped_column(primary_key=True)
    candidate_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    baseline_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    share: Mapped[float] = mapped_column(Float)  # of eligible chat turns that become A/B turns
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | stopped | promoted
    started_by: Mapped[str | None] = mapped_column(String(80))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column()


class AbTurn(Base):
    """One side-by-side turn: both replies (siblings of the user's message), which was shown on
    the left, and the user's pick. A pick of one side is a preference pair for training."""

    __tablename__ = "ab_turns"
    id: Mapped[int] = mapped_column(primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("ab_trials.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    user_message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), unique=True)
    candidate_message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    baseline_message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    candidate_version: Mapped[str] = mapped_column(String(120))
    baseline_version: Mapped[str] = mapped_column(String(120))
    left: Mapped[str] = mapped_column(String(16))  # candidate | baseline: the random order shown
    # None until picked: candidate | baseline | tie | both_bad | none (the user went on without one)
    pick: Mapped[str | None] = mapped_column(String(16))
    picked_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditLog(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_name: Mapped[str | None] = mapped_column(String(80))
    action: Mapped[str] = mapped_column(String(64))
    allowed: Mapped[bool] = mapped_column(Boolean)
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModerationTemplate(Base):
    """Reply shown instead of a flagged message, per direction (in|out) and category ('*' = any)."""

    __tablename__ = "moderation_templates"
    __table_args__ = (UniqueConstraint("direction", "category", name="uq_template_direction_category"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    direction: Mapped[str] = mapped_column(String(8))
    category: Mapped[str] = mapped_column(String(40))
    text: Mapped[str] = mapped_column(Text)
    updated_by: Mapped[str | None] = mapped_column(String(80))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
