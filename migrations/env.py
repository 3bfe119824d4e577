"""Alembic environment: migrate the service database described by `service.db.Base.metadata`.

The URL comes from, in order: a connection handed over by `service.migrate` in
`config.attributes["connection"]`, the `sqlalchemy.url` option set by `service.migrate`, or the
service settings (`QLORA_DATABASE_URL`). SQLite runs in batch mode so that later revisions can
alter columns (SQLite has no ALTER COLUMN; Alembic's "batch" recipe copies the table).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from service.db import Base
from service.database import make_engine

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from service.settings import get_settings

    return get_settings().database_url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL to stdout (`alembic upgrade head --sql`)."""
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
