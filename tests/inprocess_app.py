"""Serve the real FastAPI + Gradio app in a thread with any ChatService (e.g. a scripted engine)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import uvicorn

from tests.live_app import free_port


@contextmanager
def serve(service):
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
