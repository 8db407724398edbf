"""A retrain on the chat's machine waits between steps while replies stream (issue 15), and the
app says when they do."""

from __future__ import annotations

import os
import threading
import time

from training.chat_busy import BUSY_FRESH_S, chat_busy
from training.progress import Reporter


def test_a_fresh_busy_file_holds_the_next_step_until_it_goes_stale(tmp_path):
    """advance() returns only once the file is older than BUSY_FRESH_S, counts the wait in
    paused_s, and a missing or stale file does not hold it at all."""
    busy = tmp_path / "chat-busy"
    reporter = Reporter(show_bar=False, busy_file=str(busy), max_pause_s=30)
    start = time.monotonic()
    reporter.advance()
    assert reporter.step == 1 and reporter.paused_s == 0 and time.monotonic() - start < 0.5  # no file
    busy.touch()
    assert chat_busy(busy)
    start = time.monotonic()
    reporter.advance()
    waited = time.monotonic() - start
    assert reporter.step == 2 and BUSY_FRESH_S * 0.8 <= waited < BUSY_FRESH_S + 1
    assert reporter.paused_s >= BUSY_FRESH_S * 0.8
    old = time.time() - 10
    os.utime(busy, (old, old))
    assert not chat_busy(busy)


def test_a_chat_that_stays_busy_delays_a_step_by_at_most_max_pause_s(tmp_path):
    """The app touching the file all the time (chat never idle) holds each step max_pause_s,
    then training goes on; max_pause_s = 0 never waits."""
    busy = tmp_path / "chat-busy"
    stop = threading.Event()

    def keep_touching():
        while not stop.is_set():
            busy.touch()
            time.sleep(0.05)

    toucher = threading.Thread(target=keep_touching, daemon=True)
    toucher.start()
    try:
        time.sleep(0.1)
        start = time.monotonic()
        Reporter(show_bar=False, busy_file=str(busy), max_pause_s=0.6).advance()
        assert 0.5 <= time.monotonic() - start < 1.5
        start = time.monotonic()
        Reporter(show_bar=False, busy_file=str(busy), max_pause_s=0).advance()
        assert time.monotonic() - start < 0.3
    finally:
        stop.set()
        toucher.join()


def test_the_app_touches_the_busy_file_only_while_a_reply_is_in_flight(tmp_path):
    """TrainingControl's signal thread, for as long as the run's process lives: no file while
    nothing streams, a fresh one while a reply does, and it stops with the process."""
    from app.training_control import TrainingControl

    class Service:
        settings = None
        streaming = 0

        def in_flight(self):
            return self.streaming

    class Proc:
        alive = True

        def poll(self):
            return None if self.alive else 0

    service, proc, busy = Service(), Proc(), tmp_path / "chat-busy"
    control = TrainingControl.__new__(TrainingControl)  # only the signal thread is under test
    control.service = service
    thread = threading.Thread(target=control._signal_chat_busy, args=(proc, busy), daemon=True)
    thread.start()
    time.sleep(0.6)
    assert not busy.exists()
    service.streaming = 2
    time.sleep(0.6)
    assert chat_busy(busy)
    proc.alive = False
    thread.join(timeout=2)
    assert not thread.is_alive()
