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
