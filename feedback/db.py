"""Database engine, sessions and migrations.

SQLite by default (WAL, busy timeout, foreign keys on); PostgreSQL through DATABASE_URL.
Only Alembic creates the schema: ``migrate(url)`` runs ``upgrade head``.

    python -m feedback.db upgrade            # migrate the configured database
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

ROOT = Path(__file__).resolve().parent.parent


class DatabaseUnavailableError(RuntimeError):
    """The database cannot be reached; the message names the URL with the password hidden."""


def safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers run during a write; the busy timeout makes writers queue instead of
    # failing with "database is locked"; SQLite leaves foreign keys off unless asked.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=15000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 15})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def check_connection(engine: Engine) -> None:
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means the same thing to the user
        raise DatabaseUnavailableError(
            f"Cannot reach the database at {safe_url(str(engine.url))}: {exc.__class__.__name__}. "
            "Check that the server is running and DATABASE_URL is right."
        ) from exc


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One short transaction: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    from alembic import command

    engine = make_engine(url)
    check_connection(engine)
    engine.dispose()
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def default_url() -> str:
    # absolute, as Settings.db_url is: a command run from another directory must find the same file
    data_dir = Path(os.environ.get("CHAT_DATA_DIR", "data")).resolve()
    return os.environ.get("DATABASE_URL", f"sqlite:///{data_dir / 'chat.db'}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Migrate the database (Alembic).")
    parser.add_argument("action", choices=["upgrade", "downgrade"])
    parser.add_argument("--url", default=default_url())
    parser.add_argument("--revision", default=None)
    args = parser.parse_args()
    if args.action == "upgrade":
        migrate(args.url, args.revision or "head")
    else:
        downgrade(args.url, args.revision or "base")
    print(f"{args.action} done on {safe_url(args.url)}")


if __name__ == "__main__":
    main()
