"""Repository functions for the moderation review queue and the admin-editable templates."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback.models import ModerationEvent, ModerationTemplate, utcnow
from feedback.repository import NotFoundError, ValidationError

REVIEW_VERDICTS = ("correct", "false_positive")


def flagged_events(*, session: Session, limit: int = 100, unreviewed_only: bool = False,
                   include_passed: bool = False) -> list[ModerationEvent]:
    stmt = select(ModerationEvent)
    if not include_passed:
        stmt = stmt.where(ModerationEvent.decision.in_(("flag", "error")))
    if unreviewed_only:
        stmt = stmt.where(ModerationEvent.review.is_(None))
    return list(session.scalars(stmt.order_by(ModerationEvent.id.desc()).limit(limit)))


def review_event(*, session: Session, event_id: int, verdict: str, reviewer: str) -> ModerationEvent:
    if verdict not in REVIEW_VERDICTS:
        raise ValidationError(f"A review is one of {', '.join(REVIEW_VERDICTS)}, not {verdict!r}.")
    event = session.get(ModerationEvent, event_id)
    if event is None or event.decision == "pass":
        raise NotFoundError(f"No flagged moderation event {event_id}.")
    event.review, event.reviewed_by = verdict, reviewer
    session.flush()
    return event


def moderation_counts(*, session: Session) -> dict[str, int]:
    rows = session.execute(select(ModerationEvent.direction, ModerationEvent.decision, ModerationEvent.review,
                                  func.count()).group_by(ModerationEvent.direction, ModerationEvent.decision,
                                                         ModerationEvent.review)).all()
    counts = {"checked": 0, "flagged_in": 0, "flagged_out": 0, "errors": 0, "unreviewed": 0,
              "correct": 0, "false_positive": 0}
    for direction, decision, review, n in rows:
        counts["checked"] += n
        if decision == "error":
            counts["errors"] += n
        if decision in ("flag", "error"):
            counts[f"flagged_{direction}"] += n
            counts[review or "unreviewed"] += n
    return counts


def load_templates(*, session: Session) -> dict[tuple[str, str], str]:
    return {(t.direction, t.category): t.text for t in session.scalars(select(ModerationTemplate))}


def set_template(*, session: Session, direction: str, category: str, text: str, editor: str) -> ModerationTemplate:
    if direction not in ("in", "out"):
        raise ValidationError("direction is 'in' (user message) or 'out' (model reply)")
    category = (category or "*").strip() or "*"
    text = (text or "").strip()
    if not text or len(text) > 2000:
        raise ValidationError("A template needs 1 to 2000 characters of text.")
    row = session.scalar(select(ModerationTemplate).where(ModerationTemplate.direction == direction,
                                                          ModerationTemplate.category == category))
    if row is None:
        row = ModerationTemplate(direction=direction, category=category, text=text)
        session.add(row)
    row.text, row.updated_by, row.updated_at = text, editor, utcnow()
    session.flush()
    return row
