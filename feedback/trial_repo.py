"""Repository functions for blind A/B trials: a candidate version against the serving one.

A trial turn stores both replies as siblings of the user's message. The reply that is not
picked gets the message status ``unpicked``, so the conversation continues with the other
one (feedback.repository.latest_thread skips it): the candidate's reply when it was picked,
the serving version's otherwise (tie, both bad, or the user went on without a pick).
"""

from __future__ import annotations

import math

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.models import AbTrial, AbTurn, Message, ModelVersion, User, utcnow
from feedback.repository import NotFoundError, ValidationError, checked_id
from feedback.training_repo import has_weights

PICKS = ("candidate", "baseline", "tie", "both_bad")  # what a user may pick; "none" is set when they go on
UNPICKED = "unpicked"


def running_trial(*, session: Session) -> AbTrial | None:
    return session.scalar(select(AbTrial).where(AbTrial.status == "running").order_by(AbTrial.id.desc()).limit(1))


def get_trial(*, session: Session, trial_id) -> AbTrial:
    trial = session.get(AbTrial, checked_id(trial_id, "a trial id"))
    if trial is None:
        raise NotFoundError(f"Trial {trial_id} does not exist.")
    return trial


def list_trials(*, session: Session, limit: int = 20) -> list[AbTrial]:
    return list(session.scalars(select(AbTrial).order_by(AbTrial.id.desc()).limit(limit)))


def checked_share(share) -> float:
    """A share of chat turns in (0, 1]; ValidationError otherwise (also for NaN and non-numbers)."""
    try:
        value = float(share)
    except (TypeError, ValueError):
        raise ValidationError("The trial's share of turns must be a number between 0 and 1.") from None
    if not math.isfinite(value) or not 0 < value <= 1:
        raise ValidationError(f"The trial's share of turns must be above 0 and at most 1, not {share!r}.")
    return value


def check_new_trial(*, session: Session, candidate_version_id, share) -> tuple[ModelVersion, ModelVersion]:
    """Every check a new trial needs, writing nothing; (candidate, serving version) when all pass."""
    checked_share(share)
    version = session.get(ModelVersion, checked_id(candidate_version_id, "a version id"))
    if version is None:
        raise NotFoundError(f"Version {candidate_version_id} does not exist.")
    if version.is_active:
        raise ValidationError(f"Version {version.name} is already serving; pick another version to try against it.")
    if not has_weights(version):
        raise ValidationError(f"Version {version.name} is gone: it has no weights at {version.path}.")
    baseline = session.scalar(select(ModelVersion).where(ModelVersion.is_active.is_(True)).limit(1))
    if baseline is None:
        raise ValidationError("No version is serving, so there is nothing to try a version against.")
    if (current := running_trial(session=session)) is not None:
        raise ValidationError(f"Trial {current.id} is still running; stop it before starting another.")
    return version, baseline


def start_trial(*, session: Session, candidate_version_id, share, started_by: str | None) -> AbTrial:
    """Put a registered version on trial against the active one. Everything is checked first."""
    version, baseline = check_new_trial(session=session, candidate_version_id=candidate_version_id, share=share)
    trial = AbTrial(candidate_version_id=version.id, baseline_version_id=baseline.id, share=checked_share(share),
                    status="running", started_by=started_by)
    session.add(trial)
    session.flush()
    return trial


def candidate_of(*, session: Session, trial: AbTrial) -> tuple[str, str]:
    """(path, name) of the trial's candidate; ValidationError when that version is gone."""
    version = session.get(ModelVersion, trial.candidate_version_id) if trial.candidate_version_id else None
    if version is None or not has_weights(version):
        raise ValidationError(f"Trial {trial.id}'s version is gone; stop the trial.")
    return version.path, version.name


def end_trial(*, session: Session, trial_id, status: str = "stopped") -> AbTrial:
    if status not in ("stopped", "promoted"):
        raise ValidationError("A trial ends as stopped or promoted.")
    trial = get_trial(session=session, trial_id=trial_id)
    if trial.status != "running":
        raise ValidationError(f"Trial {trial.id} is already {trial.status}.")
    trial.status, trial.ended_at = status, utcnow()
    session.flush()
    return trial


def add_turn(*, session: Session, trial: AbTrial, user: User, user_message: Message, candidate_message: Message,
             baseline_message: Message, left: str) -> AbTurn:
    if left not in ("candidate", "baseline"):
        raise ValidationError("left must be candidate or baseline")
    turn = AbTurn(trial_id=trial.id, user_id=user.id, user_message_id=user_message.id,
                  candidate_message_id=candidate_message.id, baseline_message_id=baseline_message.id,
                  candidate_version=candidate_message.model_version or "", left=left,
                  baseline_version=baseline_message.model_version or "")
    session.add(turn)
    session.flush()
    return turn


def open_turn(*, session: Session, conversation_id: int) -> AbTurn | None:
    """The conversation's A/B turn still waiting for a pick, if any."""
    return session.scalar(select(AbTurn).join(Message, Message.id == AbTurn.user_message_id)
                          .where(Message.conversation_id == conversation_id, AbTurn.pick.is_(None)).limit(1))


def record_pick(*, session: Session, turn_id, user: User, pick) -> AbTurn:
    """The user's pick. A turn that is not theirs reads as not found (nothing is revealed)."""
    if pick not in PICKS:
        raise ValidationError(f"A pick is one of {', '.join(PICKS)}.")
    turn = session.get(AbTurn, checked_id(turn_id, "an A/B turn id"))
    if turn is None or turn.user_id != user.id:
        raise NotFoundError(f"A/B turn {turn_id} does not exist: only a side-by-side turn of yours can be picked.")
    if turn.pick is not None:
        raise ValidationError(f"This turn was already decided ({turn.pick.replace('_', ' ')}); a pick is final.")
    _close(session, turn, pick)
    return turn


def close_unpicked(*, session: Session, conversation_id: int) -> AbTurn | None:
    """The user went on without picking: the turn counts nothing and the serving reply continues."""
    turn = open_turn(session=session, conversation_id=conversation_id)
    if turn is not None:
        _close(session, turn, "none")
    return turn


def _close(session: Session, turn: AbTurn, pick: str) -> None:
    turn.pick, turn.picked_at = pick, utcnow()
    loser_id = turn.baseline_message_id if pick == "candidate" else turn.candidate_message_id
    loser = session.get(Message, loser_id) if loser_id else None
    if loser is not None:
        loser.status = UNPICKED
    session.flush()


def trial_turns(*, session: Session, trial_id: int) -> list[AbTurn]:
    return list(session.scalars(select(AbTurn).where(AbTurn.trial_id == trial_id).order_by(AbTurn.id)))
