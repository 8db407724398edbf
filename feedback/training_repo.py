"""Repository functions for training runs and model versions."""

from __future__ import annotations

import os
import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.models import ModelVersion, TrainingRun, utcnow
from feedback.repository import NotFoundError, ValidationError

ACTIVE_STATUSES = ("queued", "running", "cancelling")


def active_run(*, session: Session) -> TrainingRun | None:
    return session.scalar(select(TrainingRun).where(TrainingRun.status.in_(ACTIVE_STATUSES)).limit(1))


def create_run(*, session: Session, config: dict, requested_by: str | None, base_version_id: int | None) -> TrainingRun:
    """Only one run at a time: refuse while another is queued or running."""
    if (current := active_run(session=session)) is not None:
        raise ValidationError(f"Training run {current.id} is still {current.status}; wait for it or cancel it.")
    run = TrainingRun(status="queued", config=config, requested_by=requested_by, base_version_id=base_version_id,
                      history=[], metrics={})
    session.add(run)
    session.flush()
    return run


def get_run(*, session: Session, run_id: int) -> TrainingRun:
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise NotFoundError(f"Training run {run_id} does not exist.")
    return run


def list_runs(*, session: Session, limit: int = 20) -> list[TrainingRun]:
    return list(session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)))


def finish_run(*, session: Session, run_id: int, status: str, error: str | None = None, **fields) -> TrainingRun:
    run = get_run(session=session, run_id=run_id)
    run.status, run.error, run.finished_at = status, error, utcnow()
    for k, v in fields.items():
        setattr(run, k, v)
    session.flush()
    return run


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def fail_stale_runs(*, session: Session) -> list[int]:
    """Runs left queued/running by a crash or kill are marked failed (they changed nothing served)."""
    stale = [r for r in session.scalars(select(TrainingRun).where(TrainingRun.status.in_(ACTIVE_STATUSES)))
             if not pid_alive(r.pid)]
    for run in stale:
        run.status, run.finished_at = "failed", utcnow()
        run.error = (run.error or "") + "The training process ended unexpectedly (crashed or killed)."
    session.flush()
    return [r.id for r in stale]


# versions ------------------------------------------------------------------------------

def list_versions(*, session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())))


def active_version(*, session: Session) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.is_active.is_(True)).limit(1))


def get_version(*, session: Session, version_id: int) -> ModelVersion:
    version = session.get(ModelVersion, version_id)
    if version is None:
        raise NotFoundError(f"Model version {version_id} does not exist.")
    return version


def ensure_base_version(*, session: Session, name: str, path: str) -> ModelVersion:
    """Record the configured model as a version; it is active when nothing else is."""
    version = session.scalar(select(ModelVersion).where(ModelVersion.name == name))
    if version is None:
        version = ModelVersion(name=name, path=path, stage="base", metrics={}, config={})
        session.add(version)
        session.flush()
    if active_version(session=session) is None:
        version.is_active = True
    session.flush()
    return version


def add_version(*, session: Session, name: str, path: str, parent_id: int | None, stage: str, metrics: dict,
                config: dict, snapshot_id: int | None, training_run_id: int | None) -> ModelVersion:
    if session.scalar(select(ModelVersion.id).where(ModelVersion.name == name)) is not None:
        raise ValidationError(f"A model version named {name} exists already.")
    version = ModelVersion(name=name, path=path, parent_id=parent_id, stage=stage, metrics=metrics, config=config,
                           snapshot_id=snapshot_id, training_run_id=training_run_id, is_active=False)
    session.add(version)
    session.flush()
    return version


def has_weights(version: ModelVersion) -> bool:
    """Whether the version's directory still holds a checkpoint (what serving it needs)."""
    return os.path.isfile(os.path.join(version.path, "config.json"))


def activate_version(*, session: Session, version_id: int) -> ModelVersion:
    """Make one version the served one (promote or roll back)."""
    version = get_version(session=session, version_id=version_id)
    if not has_weights(version):
        raise ValidationError(f"Version {version.name} has no weights at {version.path}.")
    for other in session.scalars(select(ModelVersion).where(ModelVersion.is_active.is_(True))):
        other.is_active = False
    version.is_active = True
    session.flush()
    return version


# Model ids as engines name them: "SmolLM2-135M", "meta-llama/Llama-3.1-8B-Instruct", "org/model:q8".
REMOTE_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}")


def set_remote_model(*, session: Session, version_id: int, model_id: str | None) -> ModelVersion:
    """Map a version to the model id a remote engine serves it as; empty clears the mapping."""
    model_id = (model_id or "").strip()
    if model_id and not REMOTE_MODEL_ID.fullmatch(model_id):
        raise ValidationError("A remote model id is 1-200 characters: letters, digits and . _ : / @ + - "
                              f"(no spaces), starting with a letter or digit; not {model_id[:60]!r}.")
    version = get_version(session=session, version_id=version_id)
    version.remote_model = model_id or None
    session.flush()
    return version


def remote_model_of(*, session: Session, name: str) -> str | None:
    """The remote model id mapped to the version called ``name`` (None when unmapped or unknown)."""
    return session.scalar(select(ModelVersion.remote_model).where(ModelVersion.name == name))
