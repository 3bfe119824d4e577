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


@pytest.fixture(scope="session")
def fault_stack(tiny_model_dir):  # type: ignore[no-untyped-def]
    """A live production-mode service for the destructive tests (tests/faults/stack.py): private
    PostgreSQL, private Redis *without* persistence (a restart loses its queue), a uvicorn API;
    tests start and kill their own `qlora worker` processes and stop them before they end."""
    from tests.faults.faultkit import production_stack

    with production_stack(tiny_model_dir, persistent_redis=False) as stack:
        yield stack


@pytest.fixture(autouse=True)
def _workers_end_with_their_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Stop what a test using `fault_stack` started even when it failed half-way: a worker left
    alive would take the next test's job (one failure would cascade into others)."""
    yield
    if "fault_stack" in request.fixturenames:
        request.getfixturevalue("fault_stack").stop_workers()


@pytest.fixture(scope="session")
def fault_reference(fault_stack):  # type: ignore[no-untyped-def]
    """(job, adapter tensors) of the standard fault-test job run once without interruption."""
    from tests.faults.faultkit import CHECKPOINT_STEPS, MAX_STEPS, reference_run

    return reference_run(fault_stack, MAX_STEPS, checkpoint_steps=CHECKPOINT_STEPS)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print what the fault tests measured, one `key=value` per line (the README cites them)."""
    if FIGURES:
        terminalreporter.section("fault-test figures")
        for k, v in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{k}={v}")
