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


PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database per test, dropped afterwards. Required in CI, skipped elsewhere."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        admin.dispose()
        if os.environ.get("CI_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL is required in CI but unreachable at {PG_ADMIN_URL}: {exc}")
        pytest.skip(f"no PostgreSQL server at {PG_ADMIN_URL} (start one to run these tests)")
    name = f"fc_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def any_db_url(request, tmp_path):
    """Run a test on SQLite and on PostgreSQL (migrated)."""
    from feedback.db import migrate

    url = f"sqlite:///{tmp_path / 'any.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    migrate(url)
    return url
