"""Progress reporting: stage, step of total, time left and metric history into training_runs.

The app polls that row to draw progress and live plots; a terminal gets a tqdm bar too.
"""

from __future__ import annotations

import logging
import time

from tqdm import tqdm
from transformers import TrainerCallback

from feedback.db import session_scope
from feedback.training_repo import get_run
from training.chat_busy import chat_busy

log = logging.getLogger("training")


class RunCancelled(Exception):
    """The admin pressed Cancel (SIGTERM) or the run row says cancelling."""


class Reporter:
    """Writes progress to the run row (at most every ``min_interval_s``) and a terminal bar."""

    def __init__(self, session_factory=None, run_id: int | None = None, min_interval_s: float = 1.0,
                 show_bar: bool = True, busy_file: str | None = None, max_pause_s: float = 0.0):
        self.session_factory = session_factory
        self.busy_file = busy_file  # see chat_busy: wait between steps while chat streams
        self.max_pause_s = max_pause_s
        self.paused_s = 0.0
        self.show_bar = show_bar
        self.run_id = run_id
        self.min_interval_s = min_interval_s
        self._pending: list[dict] = []
        self._last_write = 0.0
        self._stage_start = time.monotonic()
        self._bar: tqdm | None = None
        self.stage = None
        self.step = 0
        self.total = 0
        self.cancel_requested = False

    def start_stage(self, stage: str, total: int) -> None:
        if self._bar is not None:
            self._bar.close()
        self.yield_to_chat()
        self.stage, self.step, self.total = stage, 0, total
        self._stage_start = time.monotonic()
        self._bar = tqdm(total=total, desc=stage, unit="step", leave=True, disable=not self.show_bar)
        if self.show_bar:
            log.warning("stage %s: %d steps", stage, total)
        self.flush(force=True)

    def yield_to_chat(self) -> None:
        """Between two steps: while the app says a reply is streaming, wait (at most
        ``max_pause_s`` at a time, so a busy chat slows training but never stops it)."""
        if not self.busy_file or self.max_pause_s <= 0 or not chat_busy(self.busy_file):
            return
        start = time.monotonic()
        while chat_busy(self.busy_file) and time.monotonic() - start < self.max_pause_s:
            time.sleep(0.1)  # a Cancel (SIGTERM) still lands: the handler runs during the sleep
        self.paused_s += time.monotonic() - start
        self._stage_start += time.monotonic() - start  # the time left counts training, not pauses

    def advance(self, step: int | None = None, **metrics) -> None:
        self.yield_to_chat()
        new_step = self.step + 1 if step is None else step
        if self._bar is not None:
            self._bar.update(max(0, new_step - self.step))
        self.step = new_step
        if metrics:
            point = {"stage": self.stage, "step": self.step, **{k: float(v) for k, v in metrics.items()}}
            self._pending.append(point)
            log.warning("%s", point)
        self.flush()

    def eta_s(self) -> float | None:
        if self.step <= 0 or self.total <= 0:
            return None
        elapsed = time.monotonic() - self._stage_start
        return elapsed / self.step * max(0, self.total - self.step)

    def flush(self, force: bool = False, **fields) -> None:
        if self.session_factory is None or self.run_id is None:
            return
        now = time.monotonic()
        if not force and not fields and now - self._last_write < self.min_interval_s:
            return
        self._last_write = now
        with session_scope(self.session_factory) as s:
            run = get_run(session=s, run_id=self.run_id)
            if run.status == "cancelling":
                self.cancel_requested = True
            run.stage, run.step, run.total, run.eta_s = self.stage, self.step, self.total, self.eta_s()
            if self._pending:
                run.history = list(run.history or []) + self._pending  # reassign: JSON columns track by value
                self._pending = []
            for k, v in fields.items():
                setattr(run, k, v)
        if self.cancel_requested:
            raise RunCancelled("cancelled by the admin")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class ReporterCallback(TrainerCallback):
    """Feeds a transformers/TRL Trainer's logs and steps into a Reporter."""

    # DPO logs its pairwise training accuracy as "rewards/accuracies": the reward model's "accuracy".
    KEYS = {"loss": "loss", "accuracy": "accuracy", "rewards/accuracies": "accuracy", "objective/rlhf_reward": "reward",
            "objective/kl": "kl", "objective/scores": "score", "eval_accuracy": "eval_accuracy"}

    def __init__(self, reporter: Reporter, stage: str):
        self.reporter = reporter
        self.stage = stage

    def on_train_begin(self, args, state, control, **kwargs):
        self.reporter.start_stage(self.stage, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self.reporter.advance(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {name: logs[key] for key, name in self.KEYS.items() if logs and key in logs}
        if metrics:
            self.reporter.advance(state.global_step, **metrics)
