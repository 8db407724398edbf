from sqlalchemy import create_engine, inspect

from feedback.db import downgrade, migrate
from feedback.models import Base


def _tables(url):
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_on_empty_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrate(url)
    assert _tables(url) == set(Base.metadata.tables)
    downgrade(url, "base")
    assert _tables(url) == set()
    migrate(url)
    assert _tables(url) == set(Base.metadata.tables)


def test_models_and_migrations_agree(tmp_path):
    """The equivalent of `alembic check`: autogenerate finds nothing to add."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    url = f"sqlite:///{tmp_path / 'c.db'}"
    migrate(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_upgrade_to_0002_marks_prompts_that_already_became_tasks(tmp_path):
    """Revision 0002 adds messages.ranking_state and marks the prompts that were turned into tasks
    before it, so the sync does not look at them again."""
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'b.db'}"
    migrate(url, "0001")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, name, role, opted_out, created_at) "
                          "VALUES (1, 'a', 'user', 0, '2026-01-01')"))
        conn.execute(text("INSERT INTO conversations (id, owner_id, title, system_prompt, created_at, updated_at) "
                          "VALUES (1, 1, 't', '', '2026-01-01', '2026-01-01')"))
        for mid in (1, 2):
            conn.execute(text("INSERT INTO messages (id, conversation_id, role, content, status, created_at) "
                              f"VALUES ({mid}, 1, 'user', 'q{mid}', 'answered', '2026-01-01')"))
        conn.execute(text("INSERT INTO ranking_tasks (context, prompt_hash, source, source_message_id, wanted, "
                          "created_at) VALUES ('[]', 'h', 'chat', 1, 1, '2026-01-01')"))
    migrate(url)
    with engine.connect() as conn:
        states = conn.execute(text("SELECT id, ranking_state FROM messages ORDER BY id")).all()
    engine.dispose()
    assert states == [(1, "task"), (2, None)]


def test_upgrade_to_0003_keeps_every_user_and_conversation(tmp_path):
    """Revision 0003 adds users.ab_opt_out in place: a copy-and-move of users on SQLite would
    cascade-delete their conversations through the foreign keys (it did, in development)."""
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'c.db'}"
    migrate(url, "0002")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, name, role, opted_out, created_at) "
                          "VALUES (1, 'a', 'user', 0, '2026-01-01')"))
        conn.execute(text("INSERT INTO conversations (id, owner_id, title, system_prompt, created_at, updated_at) "
                          "VALUES (1, 1, 't', '', '2026-01-01', '2026-01-01')"))
        conn.execute(text("INSERT INTO messages (id, conversation_id, role, content, status, created_at) "
                          "VALUES (1, 1, 'user', 'q', 'answered', '2026-01-01')"))
    migrate(url)
    with engine.connect() as conn:
        users = conn.execute(text("SELECT name, ab_opt_out FROM users")).all()
        messages = conn.execute(text("SELECT count(*) FROM messages")).scalar()
    engine.dispose()
    assert users == [("a", False)] and messages == 1
