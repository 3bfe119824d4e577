"""Private PostgreSQL databases and Redis db numbers for tests that need the real servers.

CI (`.ci/run`) runs Redis and PostgreSQL on 127.0.0.1 and sets QLORA_REQUIRE_SERVICES=1: there a
missing server fails the test. Elsewhere the production-mode tests skip. Every run gets its own
database (`CREATE DATABASE qlora_t_<random>`) and its own empty Redis db number, so concurrent
runs and other engineers' tests never see each other's rows or messages.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

PG_ADMIN_URL = os.environ.get("QLORA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("QLORA_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def require_or_skip(name: str, host: str, port: int) -> None:
    """Fail (CI) or skip (elsewhere) when `name` is not listening on host:port."""
    if _reachable(host, port):
        return
    msg = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("QLORA_REQUIRE_SERVICES") == "1":
        pytest.fail(msg + " and QLORA_REQUIRE_SERVICES=1")
    pytest.skip(msg)


@contextmanager
def private_postgres() -> Iterator[str]:
    """Create an empty database on the test server; yield its SQLAlchemy URL; drop it after."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = make_url(PG_ADMIN_URL)
    require_or_skip("PostgreSQL", admin.host or "127.0.0.1", admin.port or 5432)
    name = "qlora_t_" + secrets.token_hex(6)
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        from service.database import get_engine

        get_engine.cache_clear()  # engines of the private database hold connections: drop them
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@contextmanager
def private_redis() -> Iterator[str]:
    """Yield a `redis://host:port/N` URL of an empty db number; flush it after."""
    import redis

    base = REDIS_URL.rstrip("/")
    host, _, port = base.split("//", 1)[1].partition(":")
    require_or_skip("Redis", host, int(port or 6379))
    # High numbers first: the low ones are the usual defaults of other tools.
    for n in secrets.SystemRandom().sample(range(4, 16), 12):
        r = redis.Redis.from_url(f"{base}/{n}")
        # SETNX a marker: claims the db even against a concurrent run choosing the same number.
        if r.dbsize() == 0 and r.set("qlora-test-claim", "1", nx=True):
            try:
                yield f"{base}/{n}"
            finally:
                r.flushdb()
            return
    pytest.skip("no empty Redis db number is free")
