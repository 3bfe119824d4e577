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
    assert current_revision(url) == "0006"
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


def test_upgrade_announces_nothing_about_jobs_that_ended_before_webhooks(tmp_path):
    """0005 marks already finished jobs as announced, so the first dispatcher sends no old events."""
    url = f"sqlite:///{tmp_path}/old.db"
    command.upgrade(alembic_config(url), "0004")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('org-a', 'a', 1)"))
        for job_id, status, finished in (("ftjob-old", "succeeded", 100), ("ftjob-live", "running", None)):
            conn.execute(text(
                "INSERT INTO jobs (id, tenant_id, model, training_file, status, seed, hyperparameters, config, "
                "created_at, finished_at, attempts) VALUES (:id, 'org-a', 'm', 'file-x', :status, 1, '{}', '{}', 1, "
                ":finished, 0)"), {"id": job_id, "status": status, "finished": finished})
    upgrade(url)
    with engine.connect() as conn:
        emitted = dict(conn.execute(text("SELECT id, webhooks_emitted_at FROM jobs")).all())
    assert emitted == {"ftjob-old": 100, "ftjob-live": None}
