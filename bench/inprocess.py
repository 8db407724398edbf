"""The real FastAPI + Gradio app in a thread, and an engine that needs no weights.

``serve(service)`` runs ``app.main.create_app`` under uvicorn on a free loopback port, with
any ChatService; ``app_process`` runs ``python -m app.main`` itself in a subprocess; ``ScriptedEngine`` streams a fixed reply word by word through the real
engine interface. ``bench.load`` measures the app's own overhead with them, and the tests
use them too (they live here because bench code must not import the test tree).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from model.engine import Generation, GenerationStats


ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(service):
    import uvicorn

    from app.main import create_app

    app = create_app(service)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline:
            raise TimeoutError("in-process app did not start")
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def app_process(data_dir: Path, model: str, timeout: float = 120, **env_overrides):
    """The real app (``python -m app.main``) in a subprocess on a free port, its log in
    ``data_dir/app.log``; yields (url, process) once /healthz answers, stops it afterwards."""
    port = free_port()
    env = dict(os.environ, CHAT_DATA_DIR=str(data_dir), CHAT_MODEL=str(model), CHAT_PORT=str(port),
               CHAT_HOST="127.0.0.1", PYTHONUNBUFFERED="1")
    env.pop("DATABASE_URL", None)
    env.update({k: str(v) for k, v in env_overrides.items()})
    log = open(Path(data_dir) / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "app.main"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app exited: {(Path(data_dir) / 'app.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/healthz", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError("app did not start")
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class ScriptedEngine:
    """An engine that streams a fixed reply word by word (a word is a token: a reply longer than
    ``max_new_tokens`` words is cut there, finish "length") and records every call (a spy)."""

    def __init__(self, reply="Hello there, friend.", version="fake-v1"):
        self.reply = reply
        self.version = version
        self.calls: list[list[dict]] = []

    def stream(self, messages, params=None, cancel=None):
        self.calls.append(messages)
        cancel = cancel or threading.Event()
        stats = GenerationStats(prompt_tokens=sum(len(m["content"].split()) for m in messages))
        reply = self.reply(messages) if callable(self.reply) else self.reply
        budget = params.max_new_tokens if params is not None and params.max_new_tokens else None

        def deltas():
            words = reply.split(" ")
            for i, w in enumerate(words):
                if cancel.is_set():
                    stats.finish_reason = "cancelled"
                    return
                if budget is not None and i >= budget:  # a word is a token here
                    stats.finish_reason = "length"
                    return
                stats.completion_tokens += 1
                if stats.ttft_ms is None:
                    stats.ttft_ms = 1.0
                yield w if i == 0 else " " + w
            stats.finish_reason = "stop"

        return Generation(deltas(), stats, cancel)

    def generate(self, messages, params=None):
        gen = self.stream(messages, params)
        for _ in gen:
            pass
        return gen.text, gen.stats
