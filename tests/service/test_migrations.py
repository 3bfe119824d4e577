"""Alembic migrations build exactly the schema of service.db on a fresh SQLite and PostgreSQL.

PostgreSQL runs in a throwaway database per test (created from the `test` database on
127.0.0.1:5432 as user postgres), so parallel runs never clash. Where PostgreSQL is not
reachable the test is skipped, unless QLORA_REQUIRE_SERVICES=1 (CI), where it fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from service.db import Base
from service.migrate import alembic_config, current_revision, upgrade

PG_ADMIN_URL = os.environ.get("QLORA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _diffs(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()


@pytest.fixture()
def pg_url() -> Iterator[str]:
    name = f"qlora_mig_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # psycopg/sqlalchemy raise several types for "cannot connect"
        admin.dispose()
        if os.environ.get("QLORA_REQUIRE_SERVICES") == "1":
            pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is required (QLORA_REQUIRE_SERVICES=1): {e}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {e}")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        from service.database import get_engine

        get_engine.cache_clear()  # close pooled connections before dropping
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _check(url: str) -> None:
    assert current_revision(url) is None
    upgrade(url)
    upgrade(url)  # idempotent
    assert current_revision(url) == "0005"
    tables = set(inspect(create_engine(url)).get_table_names())
    assert set(Base.metadata.tables) <= tables
    assert _diffs(url) == [], "models and migrations disagree: write a new revision"
    command.downgrade(alembic_config(url), "base")
    assert set(inspect(create_engine(url)).get_table_names()) <= {"alembic_version"}


def test_sqlite_fresh_database(tmp_path):
    _check(f"sqlite:///{tmp_path}/fresh.db")


@pytest.mark.services
def test_postgresql_fresh_database(pg_url):
    _check(pg_url)
