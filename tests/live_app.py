"""Start the real app (python -m app.main) on a free port in a subprocess, for end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from bench.inprocess import free_port

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def live_app(data_dir: Path, model: str, timeout: float = 120, **env_overrides):
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
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
