"""Fixtures for fault tests: private servers a test may stop, kill and restart (tests/faults/services.py).

`private_redis` and `private_postgres` each yield a `ServerProcess` handle (`.url`, `.stop()`,
`.start()`, `.kill()`); the server is killed and its directory deleted after the test. When a
binary is missing the test fails under QLORA_REQUIRE_SERVICES=1 (CI) and is skipped elsewhere.
The API fixtures of tests/api (`settings`, `alice`, `bob`, `client`) are available here too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api.conftest import alice, bob, client, settings  # noqa: F401  (fixtures, re-exported)
from tests.faults.services import (FIGURES, ServerProcess, ServiceUnavailable, require, start_private_postgres,
                                   start_private_redis)


@pytest.fixture()
def private_redis() -> Iterator[ServerProcess]:
    """A private redis-server (append-only file on) on a spare port; `handle.url` is `redis://…/0`."""
    try:
        _, handle = start_private_redis()
    except ServiceUnavailable as e:
        require(e)
    try:
        yield handle
    finally:
        handle.close()


@pytest.fixture()
def private_postgres() -> Iterator[ServerProcess]:
    """A private PostgreSQL with an empty database `qlora`; `handle.url` is its SQLAlchemy URL."""
    try:
        _, handle = start_private_postgres()
    except ServiceUnavailable as e:
        require(e)
    try:
        yield handle
    finally:
        from service.database import get_engine

        get_engine.cache_clear()  # cached engines of this database must not outlive it
        handle.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print what the fault tests measured, one `key=value` per line (the README cites them)."""
    if FIGURES:
        terminalreporter.section("fault-test figures")
        for k, v in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{k}={v}")
