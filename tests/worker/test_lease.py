"""Job leases on real SQLite and PostgreSQL: one holder at a time, takeover only when it is dead."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from sqlalchemy import Engine, select, update

from service.db import Job
from tests.worker.conftest import make_job
from worker.lease import acquire, lease_is_free, make_owner, parse_owner, release, renew, transition

LEASE_S = 60


def _row(engine: Engine, job_id: str):  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return conn.execute(select(Job.__table__).where(Job.__table__.c.id == job_id)).one()


def test_second_worker_is_refused_while_the_lease_is_live(engine: Engine) -> None:
    job = make_job(engine)
    a, b = make_owner("w1@host"), make_owner("w2@host")
    assert acquire(engine, job, a, LEASE_S)
    assert not acquire(engine, job, b, LEASE_S)
    row = _row(engine, job)
    assert row.lease_owner == a and row.attempts == 1


def test_holder_may_reacquire_its_own_lease(engine: Engine) -> None:
    job = make_job(engine)
    a = make_owner("w1@host")
    assert acquire(engine, job, a, LEASE_S)
    assert acquire(engine, job, a, LEASE_S)
    assert _row(engine, job).attempts == 2


def test_holder_renewal_keeps_the_lease_live(engine: Engine) -> None:
    job = make_job(engine)
    t0 = int(time.time())
    a, b = make_owner("w1@host"), make_owner("w2@host")
    assert acquire(engine, job, a, LEASE_S, now=t0)
    assert renew(engine, job, a, LEASE_S, now=t0 + LEASE_S - 1)
    assert _row(engine, job).lease_expires_at == t0 + 2 * LEASE_S - 1
    # Past the first expiry, but renewed: still nobody else's.
    assert not acquire(engine, job, b, LEASE_S, now=t0 + LEASE_S + 1)


def test_expired_lease_is_taken_over(engine: Engine) -> None:
    job = make_job(engine)
    t0 = int(time.time())
    a, b = make_owner("w1@host"), make_owner("w2@host")
    assert acquire(engine, job, a, LEASE_S, now=t0)
    assert not acquire(engine, job, b, LEASE_S, now=t0 + LEASE_S - 1)
    assert acquire(engine, job, b, LEASE_S, now=t0 + LEASE_S + 1)
    assert _row(engine, job).lease_owner == b
    # The old holder notices: its renewal fails and its status changes are refused.
    assert not renew(engine, job, a, LEASE_S)
    assert not transition(engine, job, a, ("validating_files",), "queued")
    assert transition(engine, job, b, ("validating_files",), "queued")


def test_lease_of_a_dead_local_process_is_free_at_once(engine: Engine) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_owner = make_owner("w1@host", pid=int(dead.stdout))
    job = make_job(engine, lease_owner=dead_owner, lease_expires_at=int(time.time()) + 3600)
    assert lease_is_free(dead_owner, int(time.time()) + 3600, int(time.time()))
    assert acquire(engine, job, make_owner("w1@host"), LEASE_S)


def test_finished_jobs_are_never_acquired(engine: Engine) -> None:
    for status in ("succeeded", "failed", "cancelled"):
        job = make_job(engine, status=status)
        assert not acquire(engine, job, make_owner("w1@host"), LEASE_S)


def test_release_only_by_the_holder(engine: Engine) -> None:
    job = make_job(engine)
    a, b = make_owner("w1@host"), make_owner("w2@host")
    assert acquire(engine, job, a, LEASE_S)
    release(engine, job, b)
    assert _row(engine, job).lease_owner == a
    release(engine, job, a)
    assert _row(engine, job).lease_owner is None
    assert acquire(engine, job, b, LEASE_S)


def test_concurrent_acquires_have_exactly_one_winner(engine: Engine) -> None:
    job = make_job(engine)
    owners = [make_owner(f"w{i}@host") for i in range(6)]
    wins: list[str] = []
    barrier = threading.Barrier(len(owners))

    def race(owner: str) -> None:
        barrier.wait()
        if acquire(engine, job, owner, LEASE_S):
            wins.append(owner)

    threads = [threading.Thread(target=race, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert _row(engine, job).lease_owner == wins[0]


def test_a_cancel_recorded_by_the_api_is_not_overwritten(engine: Engine) -> None:
    job = make_job(engine)
    a = make_owner("w1@host")
    assert acquire(engine, job, a, LEASE_S)
    with engine.begin() as conn:  # the API cancels a job that has not started training
        conn.execute(update(Job.__table__).where(Job.__table__.c.id == job).values(status="cancelled"))
    assert not transition(engine, job, a, ("validating_files",), "queued")
    assert _row(engine, job).status == "cancelled"


def test_owner_strings_round_trip() -> None:
    owner = make_owner("qlora@a|b", pid=123)
    assert parse_owner(owner)[0] == "qlora@a|b"
    assert parse_owner(owner)[2] == 123
    assert parse_owner("something else") is None
