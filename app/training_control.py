"""Start, cancel, promote and roll back: the admin's training actions, checked on the server.

Training runs as a separate process (``python -m training.retrain --run-id N``) so chat keeps
answering; promote swaps the serving engine in place without a restart.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from app.auth import require_role
from feedback import training_repo
from feedback import trial_repo
from feedback.db import session_scope
from feedback.repository import checked_id
from training.config import RetrainConfig, corpus_file
from training.chat_busy import BUSY_FILE_ENV, CHAT_BUSY_TOUCH_S


def nice_prefix(niceness: int) -> list[str]:
    """``nice -n N`` before the retrain's command: set before exec, so every thread torch and
    llama.cpp start in it inherits the priority (a setpriority on the pid reaches one thread)."""
    niceness = max(0, min(19, int(niceness)))
    return ["nice", "-n", str(niceness)] if niceness and shutil.which("nice") else []

ROOT = Path(__file__).resolve().parent.parent


class TrainingControl:
    def __init__(self, service, engine_loader=None):
        self.service = service
        self.settings = service.settings
        # How a version directory becomes an engine (tests pass a cheaper one, used for trials too).
        self._load_engine = engine_loader or _default_loader(service)
        self._load_trial_engine = (lambda path, name, share: engine_loader(path, name)) if engine_loader \
            else _default_loader(service, trial=True)
        self._procs: dict[int, subprocess.Popen] = {}

    @property
    def factory(self):
        return self.service.session_factory

    def recover(self) -> list[int]:
        """At start-up: runs a crash or kill left 'running' are marked failed; a running trial is
        served again (or stopped, saying why, when its version can no longer be loaded)."""
        with session_scope(self.factory) as s:
            failed = training_repo.fail_stale_runs(session=s)
            trial = trial_repo.running_trial(session=s)
            trial_id = trial.id if trial else None
        if trial_id is not None:
            try:
                self._serve_trial(trial_id)
            except Exception as exc:  # a missing or broken version: the chat must still start
                with session_scope(self.factory) as s:
                    trial_repo.end_trial(session=s, trial_id=trial_id)
                import logging

                logging.getLogger("app").warning("trial %s stopped at start-up: %s", trial_id, exc)
        return failed

    # A/B trials --------------------------------------------------------------------------
    def start_trial(self, user: str, version_id, share) -> int:
        """Put a registered version on trial for ``share`` of chat turns. Load first, then record."""
        require_role(self.factory, user, ("admin",), "start trial", f"version {version_id} share {share}")
        with session_scope(self.factory) as s:  # every check before anything loads or is written
            version, _ = trial_repo.check_new_trial(session=s, candidate_version_id=version_id, share=share)
            path, name = version.path, version.name
        share = trial_repo.checked_share(share)
        engine = self._load_trial_engine(path, name, share)  # a version that does not load never reaches a user
        with session_scope(self.factory) as s:
            trial_id = trial_repo.start_trial(session=s, candidate_version_id=version_id, share=share,
                                              started_by=user).id
        self.service.side_by_side.start(trial_id, engine, share)
        return trial_id

    def stop_trial(self, user: str, trial_id) -> None:
        require_role(self.factory, user, ("admin",), "stop trial", f"trial {trial_id}")
        with session_scope(self.factory) as s:
            trial_repo.end_trial(session=s, trial_id=trial_id)
        self.service.side_by_side.stop()

    def promote_trial(self, user: str, trial_id) -> str:
        """Serve the trial's candidate from now on and end the trial as promoted."""
        require_role(self.factory, user, ("admin",), "promote trial", f"trial {trial_id}")
        with session_scope(self.factory) as s:
            trial = trial_repo.get_trial(session=s, trial_id=trial_id)
            if trial.status != "running" or trial.candidate_version_id is None:
                raise training_repo.ValidationError(f"Trial {trial.id} is {trial.status}; only a running trial's "
                                            "version can be promoted from it.")
            version_id = trial.candidate_version_id
        name = self.promote(user, version_id)
        with session_scope(self.factory) as s:
            trial_repo.end_trial(session=s, trial_id=trial_id, status="promoted")
        self.service.side_by_side.stop()
        return name

    def _serve_trial(self, trial_id: int) -> None:
        with session_scope(self.factory) as s:
            trial = trial_repo.get_trial(session=s, trial_id=trial_id)
            path, name = trial_repo.candidate_of(session=s, trial=trial)
            share = trial.share
        self.service.side_by_side.start(trial_id, self._load_trial_engine(path, name, share), share)

    def start(self, user: str, config: dict | None = None) -> int:
        # The role first: a non-admin's attempt is refused and audited whatever settings it sent.
        require_role(self.factory, user, ("admin",), "start retrain", json.dumps(config or {}, default=str))
        cfg = RetrainConfig.from_dict(config or {}).validate()  # bad settings fail before anything starts
        if cfg.pretrain_corpus:
            corpus_file(self.settings.data_dir, cfg.pretrain_corpus)  # a corpus that is not there, too
        self._reap()
        with session_scope(self.factory) as s:
            training_repo.fail_stale_runs(session=s)
            current = training_repo.active_version(session=s)
            run = training_repo.create_run(session=s, config=cfg.to_dict(), requested_by=user,
                                   base_version_id=current.id if current else None)
            run_id = run.id
            log_path = Path(self.settings.data_dir).resolve() / "runs" / f"run-{run_id}" / "retrain.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            run.log_path = str(log_path)
        busy_file = Path(self.settings.data_dir).resolve() / "runs" / "chat-busy"
        env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", PYTHONUNBUFFERED="1", **{BUSY_FILE_ENV: str(busy_file)})
        cmd = [*nice_prefix(self.settings.retrain_nice), sys.executable, "-m", "training.retrain",
               "--run-id", str(run_id), "--url", self.settings.db_url,
               "--data-dir", str(Path(self.settings.data_dir).resolve()), "--config-json", json.dumps(cfg.to_dict())]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self._procs[run_id] = proc
        with session_scope(self.factory) as s:
            run = training_repo.get_run(session=s, run_id=run_id)
            run.pid = proc.pid
        threading.Thread(target=self._signal_chat_busy, args=(proc, busy_file), name=f"chat-busy-{run_id}",
                         daemon=True).start()
        return run_id

    def _signal_chat_busy(self, proc: subprocess.Popen, busy_file: Path) -> None:
        """While the run lives: touch ``busy_file`` whenever a reply is streaming (training.progress
        waits between steps while it is fresh)."""
        while proc.poll() is None:
            try:
                if self.service.in_flight() > 0:
                    busy_file.touch()
            except OSError:  # a full or read-only disk: training then simply does not wait
                pass
            time.sleep(CHAT_BUSY_TOUCH_S)

    def cancel(self, user: str, run_id: int) -> None:
        require_role(self.factory, user, ("admin",), "cancel retrain", f"run {run_id}")
        with session_scope(self.factory) as s:
            run = training_repo.get_run(session=s, run_id=run_id)
            if run.status not in training_repo.ACTIVE_STATUSES:
                raise training_repo.ValidationError(f"Run {run_id} is {run.status}; only a running run can be cancelled.")
            run.status = "cancelling"
            pid = run.pid
        if pid and training_repo.pid_alive(pid):
            os.kill(pid, signal.SIGTERM)

    def promote(self, user: str, version_id: int, action: str = "promote") -> str:
        """Serve ``version_id`` from now on. In-flight replies finish on the old engine."""
        require_role(self.factory, user, ("admin",), f"{action} model", f"version {version_id}")
        version_id = checked_id(version_id, "a version id")
        with session_scope(self.factory) as s:
            version = training_repo.get_version(session=s, version_id=version_id)
            path, name = version.path, version.name
        engine = self._load_engine(path, name)  # load first: a broken version never replaces a working one
        with session_scope(self.factory) as s:
            training_repo.activate_version(session=s, version_id=version_id)
        self.service.swap_engine(engine)
        return name

    def rollback(self, user: str, version_id: int) -> str:
        return self.promote(user, version_id, action="roll back")

    def map_remote_model(self, user: str, version_id, model_id) -> str:
        """Name the model id a remote engine serves ``version_id`` as (empty clears it). When that
        version is the one being served by remote servers, the engine is rebuilt to ask for it."""
        require_role(self.factory, user, ("admin",), "map remote model", f"version {version_id}: {str(model_id)[:80]}")
        version_id = checked_id(version_id, "a version id")
        if not isinstance(model_id, (str, type(None))):
            raise training_repo.ValidationError("A remote model id is text.")
        with session_scope(self.factory) as s:
            version = training_repo.set_remote_model(session=s, version_id=version_id, model_id=model_id)
            mapped, name, path, active = version.remote_model, version.name, version.path, version.is_active
        if active and self.settings.engine == "openai":
            self.service.swap_engine(self._load_engine(path, name))
        return mapped or ""

    def _reap(self) -> None:
        for run_id, proc in list(self._procs.items()):
            if proc.poll() is not None:
                del self._procs[run_id]


def _default_loader(service, trial: bool = False):
    from app.settings import engine_options, trial_engine_options
    from model.loader import build_engine

    def remote_model(name: str) -> str | None:  # the id mapped in Admin > Training (CHAT_ENGINE=openai)
        with session_scope(service.session_factory) as s:
            return training_repo.remote_model_of(session=s, name=name)

    def load(path: str, name: str):
        return build_engine(path, name, **engine_options(service.settings, remote_model(name)))

    def first_tokens_pending() -> int:  # of whichever engine serves now (Promote swaps it)
        return getattr(service.engine, "first_tokens_pending", lambda: 0)()

    def load_trial(path: str, name: str, share: float):  # fewer slots and threads: app.settings
        return build_engine(path, name, **trial_engine_options(service.settings, share, remote_model(name)),
                            yields_to=first_tokens_pending if service.settings.trial_yields else None)

    return load_trial if trial else load
