"""Shared fixtures: a migrated SQLite database, a tiny random model, settings in tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from model.engine import Engine

    return Engine.from_path(tiny_model_dir, "tiny-v0", device="cpu")


@pytest.fixture
def db_url(tmp_path) -> str:
    from feedback.db import migrate

    url = f"sqlite:///{tmp_path / 'test.db'}"
    migrate(url)
    return url


@pytest.fixture
def session_factory(db_url):
    from feedback.db import make_engine, make_session_factory

    engine = make_engine(db_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def session(session_factory):
    s = session_factory()
    yield s
    s.rollback()
    s.close()


@pytest.fixture
def settings(tmp_path, db_url):
    from app.settings import Settings

    return Settings(data_dir=str(tmp_path / "data"), database_url=db_url, messages_per_minute=0)
