"""Training yields the cores to chat: the signal between the app and a retrain on the same machine.

The app (app.training_control) touches a file every CHAT_BUSY_TOUCH_S while a reply streams, and
the retrain (training.progress.Reporter) waits between steps while it is fresh. llama.cpp's
threads spin at barriers, so even a trainer at nice 19 beside them cut chat to a fraction of its
tokens/s (bench.chat_contention). No torch here: the app imports it.
"""

from __future__ import annotations

import os
import time

BUSY_FILE_ENV = "CHAT_BUSY_FILE"
CHAT_BUSY_TOUCH_S = 0.25
BUSY_FRESH_S = 1.0  # a stale file (the app gone, or idle for a second) lets training go on


def chat_busy(path: str | os.PathLike | None) -> bool:
    if not path:
        return False
    try:
        return time.time() - os.stat(path).st_mtime < BUSY_FRESH_S
    except OSError:
        return False
