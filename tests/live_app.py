"""Start the real app (python -m app.main) on a free port in a subprocess, for end-to-end tests."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from bench.inprocess import ROOT, app_process

__all__ = ["ROOT", "live_app"]


@contextmanager
def live_app(data_dir: Path, model: str, timeout: float = 120, **env_overrides):
    """The app's URL; bench.inprocess.app_process does the work (benches use it too)."""
    with app_process(data_dir, model, timeout, **env_overrides) as (url, _proc):
        yield url
