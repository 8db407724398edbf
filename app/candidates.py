"""Generate candidate replies for ranking tasks ahead of the annotators, in the background.

Each task gets K replies from the serving model with varied sampling, each checked by output
moderation (a flagged candidate can be ranked but never becomes a "chosen" reply).

One bad row never stops the worker: a chat prompt that cannot become a task is marked
skipped at once; a task whose candidates fail ``max_failures`` rounds in a row is marked
skipped (with the error); each is logged once and the worker goes on with the rest.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.exc import InterfaceError, OperationalError

from app.active_ranking import TaskPrioritizer
from feedback import annotation_repo
from feedback.db import session_scope
from model.engine import EngineBusyError, SamplingParams

log = logging.getLogger(__name__)

# Not the row's fault: the database or the model is busy or away; the next round retries.
TRANSIENT = (EngineBusyError, OperationalError, InterfaceError)

# Varied sampling so candidates differ: from careful to adventurous.
VARIANTS = [dict(temperature=0.3, top_p=0.9), dict(temperature=0.7, top_p=0.95), dict(temperature=1.0, top_p=1.0),
            dict(temperature=0.5, top_p=0.8), dict(temperature=0.9, top_p=0.9), dict(temperature=0.2, top_p=1.0)]


class CandidateWorker:
    def __init__(self, service, k: int = 4, ahead: int = 3, max_new_tokens: int | None = None, interval_s: float = 10.0,
                 max_failures: int = 3, prioritize: bool = True, pool: int = 12):
        self.service = service
        # Uncertainty-first order (app/active_ranking.py): once its preference head exists the
        # worker keeps ``pool`` tasks ready instead of ``ahead``, so the order has a choice.
        self.prioritizer = TaskPrioritizer(service, k) if prioritize else None
        self.pool = pool
        self.max_failures = max_failures
        self._failures: dict[int, int] = {}  # task id -> rounds in a row its candidates failed
        self.k = k
        self.ahead = ahead
        # The settings' budget unless given (CHAT_RANKING_CANDIDATE_TOKENS).
        self.max_new_tokens = service.settings.ranking_candidate_tokens if max_new_tokens is None else max_new_tokens
        try:  # at startup, not as a failure on every task later; the engine's own bounds
            SamplingParams(max_new_tokens=self.max_new_tokens).validate()
        except ValueError as e:
            raise ValueError(f"The candidate budget (CHAT_RANKING_CANDIDATE_TOKENS) "
                             f"{str(e).removeprefix('max_new_tokens ')}, not {self.max_new_tokens}") from e
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="candidates", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # keep the worker alive; the next round retries
                log.exception("candidate generation failed")
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def run_once(self, limit: int | None = None) -> int:
        """Sync chat prompts into tasks, then fill tasks until ``ahead`` are ready for annotators
        (``limit``: this many more, for an annotator waiting). Returns candidates made. With
        ``ahead`` ready it makes nothing: 598 imported prompts must not keep the CPU busy while
        nobody ranks; each ranking saved wakes it to top the lookahead up again."""
        with self._lock:  # one filler at a time (background loop or an annotator waiting)
            self._sync_prompts()
            with session_scope(self.service.session_factory) as s:
                wanted = limit or max(0, self._lookahead() - annotation_repo.ready_task_count(session=s, k=self.k))
                todo = [(t.id, t.context, len(t.candidates))
                        for t in annotation_repo.tasks_needing_candidates(session=s, k=self.k, limit=wanted)] if wanted else []
            made = 0
            for task_id, context, have in todo:
                try:
                    for i in range(have, self.k):
                        if self._stop.is_set():
                            return made
                        made += self._make(task_id, context, i)
                except TRANSIENT:
                    raise
                except Exception as exc:
                    self._task_failed(task_id, exc)
                    continue
                self._failures.pop(task_id, None)
            self._prioritize()
            return made

    def _lookahead(self) -> int:
        return self.pool if self.prioritizer is not None and self.prioritizer.head is not None else self.ahead

    def _prioritize(self) -> None:
        """Score ready tasks for the queue's order; a failure leaves arrival order, never the worker."""
        if self.prioritizer is None:
            return
        try:
            self.prioritizer.update()
        except TRANSIENT:
            raise
        except FileNotFoundError as exc:  # a remote engine: no local weights to read features from
            log.warning("ranking tasks keep arrival order: %s", exc)
            self.prioritizer = None
        except Exception:
            log.warning("ranking tasks keep arrival order this round: the preference head failed", exc_info=True)

    def _sync_prompts(self) -> int:
        """Each prompt in its own transaction, so a bad one is skipped without undoing the rest."""
        factory, wanted = self.service.session_factory, self.service.settings.annotations_per_task
        with session_scope(factory) as s:
            ids = annotation_repo.chat_prompts_to_sync(session=s)
        added = 0
        for message_id in ids:
            try:
                with session_scope(factory) as s:
                    added += annotation_repo.task_from_message(session=s, message_id=message_id, wanted=wanted) is not None
            except TRANSIENT:
                raise
            except Exception:
                log.warning("chat prompt %s cannot become a ranking task; skipped for good", message_id,
                            exc_info=True)
                with session_scope(factory) as s:
                    annotation_repo.mark_message_skipped(session=s, message_id=message_id)
        return added

    def _task_failed(self, task_id: int, exc: Exception) -> None:
        """Retry a failing task a few rounds (the cause may pass), then give up on it for good."""
        self._failures[task_id] = self._failures.get(task_id, 0) + 1
        if self._failures[task_id] < self.max_failures:
            log.info("candidates for ranking task %s failed (%s); retrying next round", task_id, exc)
            return
        self._failures.pop(task_id)
        log.warning("candidates for ranking task %s failed %s rounds in a row; task skipped for good",
                    task_id, self.max_failures, exc_info=exc)
        with session_scope(self.service.session_factory) as s:
            annotation_repo.mark_task_skipped(session=s, task_id=task_id, reason=f"{exc.__class__.__name__}: {exc}")

    def _foreground_engine_free(self, timeout_s: float = 30.0) -> None:
        """Chat comes first: wait while any chat reply is being generated."""
        deadline = time.monotonic() + timeout_s
        while self.service.in_flight() > 0 and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.2)

    def _make(self, task_id: int, context: list[dict], i: int) -> int:
        self._foreground_engine_free()
        serving = self.service.engine
        # Outside the chat batcher (same weights): a long candidate must never hold a chat
        # reply back until its batch finishes.
        engine = serving.unbatched() if hasattr(serving, "unbatched") else serving
        params = SamplingParams(max_new_tokens=self.max_new_tokens, seed=task_id * 100 + i,
                                **VARIANTS[i % len(VARIANTS)])
        text, stats = engine.generate(context, params)
        verdict = self.service.moderator.check(text, direction="out") if self.service.moderator else None
        with session_scope(self.service.session_factory) as s:
            from feedback.models import RankingTask

            task = s.get(RankingTask, task_id)
            if task is None:
                return 0
            annotation_repo.add_candidate(session=s, task=task, content=text, model_version=engine.version,
                                sampling=params.to_dict(), finish_reason=stats.finish_reason,
                                moderation=None if verdict is None else ("flagged" if verdict.flagged else "pass"))
        return 1
