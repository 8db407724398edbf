"""The same schema and writes on SQLite and PostgreSQL: migrations, round trip, concurrency."""

import threading

import pytest
from sqlalchemy import create_engine, func, select, text

from feedback import repository
from feedback.db import downgrade, make_engine, make_session_factory, migrate, session_scope
from feedback.models import Base, Message, Vote
from tests.test_migrations import _tables


@pytest.mark.postgres
def test_migration_round_trip_on_postgres(pg_url):
    migrate(pg_url)
    assert _tables(pg_url) == set(Base.metadata.tables)
    downgrade(pg_url, "base")
    assert _tables(pg_url) == set()
    migrate(pg_url)
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(pg_url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


def test_round_trip(any_db_url):
    factory = make_session_factory(make_engine(any_db_url))
    with session_scope(factory) as s:
        user = repository.get_or_create_user(session=s, name="alice")
        conv = repository.create_conversation(session=s, owner=user)
        q = repository.add_message(session=s, conversation=conv, role="user", content="Ünïcode ✓ question")
        a = repository.add_message(session=s, conversation=conv, role="assistant", content="answer", parent=q,
                             sampling={"temperature": 0.3})
        repository.add_vote(session=s, message_id=a.id, user=user, value=-1, reason="wrong")
    with session_scope(factory) as s:
        thread = repository.latest_thread(session=s, conversation=repository.list_conversations(session=s, owner=user)[0])
        assert [m.content for m in thread] == ["Ünïcode ✓ question", "answer"]
        assert thread[1].sampling == {"temperature": 0.3}
        assert s.scalar(select(Vote.reason)) == "wrong"


def test_concurrent_feedback_writes(any_db_url):
    """8 threads x 500 writes: exact counts, no 'database is locked', integrity intact."""
    engine = make_engine(any_db_url)
    factory = make_session_factory(engine)
    with session_scope(factory) as s:
        owner = repository.get_or_create_user(session=s, name="owner")
        conv = repository.create_conversation(session=s, owner=owner)
        conv_id = conv.id
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            with session_scope(factory) as s:
                user = repository.get_or_create_user(session=s, name=f"writer{n}")
            for i in range(500):
                with session_scope(factory) as s:
                    c = s.get(type(conv), conv_id)
                    msg = repository.add_message(session=s, conversation=c, role="assistant", content=f"{n}-{i}")
                    repository.add_vote(session=s, message_id=msg.id, user=user, value=1 if i % 2 else -1)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with session_scope(factory) as s:
        assert s.scalar(select(func.count(Message.id))) == 4000
        assert s.scalar(select(func.count(Vote.id))) == 4000
        orphans = s.scalar(select(func.count(Vote.id)).where(Vote.message_id.not_in(select(Message.id))))
        assert orphans == 0
        if any_db_url.startswith("sqlite"):
            assert s.execute(text("PRAGMA integrity_check")).scalar() == "ok"
            assert s.execute(text("PRAGMA foreign_key_check")).all() == []
    engine.dispose()
