"""Repository functions for the moderation review queue and the admin-editable templates."""

from __future__ import annotations

import hashlib

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback.models import ModerationEvent, ModerationTemplate, utcnow
from feedback.repository import NotFoundError, ValidationError, checked_id, checked_text

REVIEW_VERDICTS = ("correct", "false_positive", "missed")
# What a review says about the text: flagged and rightly so, or passed but should have been flagged.
_HARMFUL = {("flag", "correct"), ("pass", "missed")}
_ACCEPTABLE = {("flag", "false_positive"), ("pass", "correct")}


def reviewed_as(harmful: bool):
    """SQL condition: events an admin's review called harmful (or acceptable), from the sets above."""
    from sqlalchemy import and_, or_

    return or_(*(and_(ModerationEvent.decision == d, ModerationEvent.review == r)
                 for d, r in sorted(_HARMFUL if harmful else _ACCEPTABLE)))


def record_verdict(*, session: Session, verdict, message_id: int | None, user_id: int | None = None) -> ModerationEvent:
    """Store a moderation verdict (``model.moderation.Verdict``) as one moderation_events row."""
    event = ModerationEvent(
        message_id=message_id, user_id=user_id, direction=verdict.direction, text=verdict.text,
        text_hash=hashlib.sha256(verdict.text.encode()).hexdigest(), backend=verdict.backend,
        scores=verdict.scores, thresholds=verdict.thresholds,
        decision="error" if verdict.error else ("flag" if verdict.flagged else "pass"),
        category=verdict.category, error=verdict.error)
    session.add(event)
    return event


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
    event = session.get(ModerationEvent, checked_id(event_id, "an event id"))
    if event is None:
        raise NotFoundError(f"No moderation event {event_id}.")
    if (event.decision, verdict) not in _HARMFUL | _ACCEPTABLE:
        allowed = "correct or missed" if event.decision == "pass" else "correct or false positive"
        raise ValidationError(f"Event {event_id} was a {event.decision}: mark it {allowed}.")
    event.review, event.reviewed_by = verdict, reviewer
    session.flush()
    return event


def review_label_rows(*, session: Session) -> list[dict]:
    """Training rows for the learned moderation head from the admin's decisions: {text, label,
    source}, oldest first (so a later decision on the same text wins). Backend errors say
    nothing about the text and are left out."""
    rows = []
    for e in session.scalars(select(ModerationEvent).where(ModerationEvent.review.is_not(None))
                             .order_by(ModerationEvent.id)):
        key = (e.decision, e.review)
        if key in _HARMFUL | _ACCEPTABLE:
            rows.append({"text": e.text, "label": int(key in _HARMFUL), "source": "review",
                         "category": e.category if key in _HARMFUL and e.category not in (None, "error") else None})
    return rows


def unflagged_user_texts(*, session: Session, limit: int = 500) -> list[str]:
    """Recent user messages that passed input moderation and that no review called harmful: the
    ordinary chat a head's flag rate is measured on."""
    missed = select(ModerationEvent.text).where(ModerationEvent.review == "missed")
    stmt = (select(ModerationEvent.text).where(ModerationEvent.direction == "in", ModerationEvent.decision == "pass",
                                               ModerationEvent.text.not_in(missed))
            .order_by(ModerationEvent.id.desc()).limit(limit))
    return list(dict.fromkeys(session.scalars(stmt)))


def uncertain_events(*, session: Session, backend: str, threshold: float, limit: int = 100,
                     window: int = 2000) -> list[ModerationEvent]:
    """Unreviewed events whose ``backend`` score is nearest the threshold (active review: the
    decisions that teach a head the most), from the newest ``window`` events."""
    events = session.scalars(select(ModerationEvent).where(ModerationEvent.review.is_(None),
                                                           ModerationEvent.decision.in_(("flag", "pass")))
                             .order_by(ModerationEvent.id.desc()).limit(window))
    scored = [(abs(max(e.scores[backend].values(), default=0.0) - threshold), e) for e in events
              if isinstance(e.scores, dict) and isinstance(e.scores.get(backend), dict)]
    return [e for _, e in sorted(scored, key=lambda t: (t[0], -t[1].id))[:limit]]


def moderation_counts(*, session: Session) -> dict[str, int]:
    rows = session.execute(select(ModerationEvent.direction, ModerationEvent.decision, ModerationEvent.review,
                                  func.count()).group_by(ModerationEvent.direction, ModerationEvent.decision,
                                                         ModerationEvent.review)).all()
    counts = {"checked": 0, "flagged_in": 0, "flagged_out": 0, "errors": 0, "unreviewed": 0,
              "correct": 0, "false_positive": 0, "missed": 0}
    for direction, decision, review, n in rows:
        counts["checked"] += n
        if decision == "error":
            counts["errors"] += n
        if decision in ("flag", "error"):
            counts[f"flagged_{direction}"] += n
            counts[review or "unreviewed"] += n
        elif review == "missed":
            counts["missed"] += n
    return counts


def load_templates(*, session: Session) -> dict[tuple[str, str], str]:
    return {(t.direction, t.category): t.text for t in session.scalars(select(ModerationTemplate))}


def set_template(*, session: Session, direction: str, category: str, text: str, editor: str) -> ModerationTemplate:
    if direction not in ("in", "out"):
        raise ValidationError("direction is 'in' (user message) or 'out' (model reply)")
    category = checked_text(category or "*", "A category name", 40) or "*"
    text = checked_text(text or "", "A template", 2000)
    if not text:
        raise ValidationError("A template needs 1 to 2000 characters of text.")
    row = session.scalar(select(ModerationTemplate).where(ModerationTemplate.direction == direction,
                                                          ModerationTemplate.category == category))
    if row is None:
        row = ModerationTemplate(direction=direction, category=category, text=text)
        session.add(row)
    row.text, row.updated_by, row.updated_at = text, editor, utcnow()
    session.flush()
    return row
