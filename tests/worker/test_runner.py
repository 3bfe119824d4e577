"""`DbCallback` and `LeaseKeeper` on real SQLite and PostgreSQL: a holder that stalled past its
lease publishes nothing once it wakes up (See Note: stalled holders in worker/runner.py), not even
when it was frozen right after a check that found its lease live (See Note: fencing tokens in
worker/lease.py).

The stall is simulated by ageing the keeper's last renewal, which is exactly what a frozen
process sees when it resumes; tests/faults/test_worker_kill.py freezes a real worker with SIGSTOP.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from service.db import Checkpoint, Job, JobEvent
from tests.worker.conftest import make_job
from worker.lease import acquire, make_owner
from worker.runner import DbCallback, LeaseKeeper, LeaseLost

LEASE_S = 6
HEARTBEAT_S = 1


def _setup(engine: Engine, tmp_path: Path) -> tuple[str, LeaseKeeper, DbCallback]:
    job_id = make_job(engine, status="running")
    lease = acquire(engine, job_id, make_owner("w1@stalled"), LEASE_S)
    assert lease
    with engine.connect() as conn:
        tenant = conn.execute(select(Job.__table__.c.tenant_id).where(Job.__table__.c.id == job_id)).scalar_one()
    keeper = LeaseKeeper(engine, lease, LEASE_S, HEARTBEAT_S)  # not started: the test drives it
    cb = DbCallback(engine, job_id, "ft:tiny:acme::x", tenant, tmp_path, keeper, deadline=math.inf)
    return job_id, keeper, cb


def _metrics_events(engine: Engine, job_id: str) -> list[int]:
    t = JobEvent.__table__
    with engine.connect() as conn:
        return [r.data["step"] for r in conn.execute(select(t).where(t.c.job_id == job_id, t.c.type == "metrics"))]


def test_live_holder_records_its_steps(engine: Engine, tmp_path: Path) -> None:
    job_id, keeper, cb = _setup(engine, tmp_path)
    keeper.last_renewed -= 10 * HEARTBEAT_S  # stalled, but nobody took the job: the check renews it
    cb.on_metrics(1, {"train_loss": 1.0, "train_mean_token_accuracy": 0.5})
    assert not cb.should_stop(1)
    assert _metrics_events(engine, job_id) == [1]
    with engine.connect() as conn:
        expires = conn.execute(select(Job.__table__.c.lease_expires_at).where(Job.__table__.c.id == job_id)).scalar_one()
    assert expires >= int(time.time()) + LEASE_S - 1


def test_stalled_holder_whose_job_was_taken_over_publishes_nothing(engine: Engine, tmp_path: Path) -> None:
    job_id, keeper, cb = _setup(engine, tmp_path)
    cb.on_metrics(1, {"train_loss": 1.0})
    # The holder freezes past its lease; another worker takes the job over.
    keeper.last_renewed -= LEASE_S + 1
    assert acquire(engine, job_id, make_owner("w2@rescuer"), LEASE_S, now=int(time.time()) + LEASE_S + 1)
    # It wakes up mid-step: the step it was in is not published, neither as an event nor a checkpoint row.
    with pytest.raises(LeaseLost):
        cb.on_metrics(2, {"train_loss": 0.9})
    with pytest.raises(LeaseLost):
        cb.on_checkpoint(2, tmp_path / "step-00000002", {"train_loss": 0.9})
    # Nor the engine's "stopped at step" note: should_stop raises instead of returning True.
    with pytest.raises(LeaseLost):
        cb.should_stop(2)
    assert cb.stop_reason == "lease_lost"
    assert _metrics_events(engine, job_id) == [1]


def _job_and_rows(engine: Engine, job_id: str) -> tuple:  # type: ignore[type-arg]
    """Everything a holder may write for the job: its row and its event and checkpoint rows."""
    jobs, events, ckpts = Job.__table__, JobEvent.__table__, Checkpoint.__table__
    with engine.connect() as conn:
        return (
            tuple(conn.execute(select(jobs).where(jobs.c.id == job_id)).one()),
            [tuple(r) for r in conn.execute(select(events).where(events.c.job_id == job_id).order_by(events.c.seq))],
            [tuple(r) for r in conn.execute(select(ckpts).where(ckpts.c.job_id == job_id).order_by(ckpts.c.seq))],
        )


def test_holder_frozen_after_its_check_writes_nothing(engine: Engine, tmp_path: Path) -> None:
    """The keeper renewed a moment ago, so no check asks the database; meanwhile (the holder was
    frozen right after that renewal, long enough for its lease to expire) the job was taken over.
    Every write is refused by the database itself: no progress, no event, no checkpoint row."""
    job_id, keeper, cb = _setup(engine, tmp_path)
    cb.on_start({"total_steps": 10})
    cb.on_metrics(1, {"train_loss": 1.0, "trained_tokens": 100})
    assert acquire(engine, job_id, make_owner("w2@rescuer"), LEASE_S, now=int(time.time()) + LEASE_S + 1)
    keeper.last_renewed = time.monotonic()  # fresh: confirm() trusts it without a query
    before = _job_and_rows(engine, job_id)
    for write in (
        lambda: cb.on_metrics(2, {"train_loss": 0.9, "trained_tokens": 200}),
        lambda: cb.on_message("info", "stopped at step 2 of 10"),
        lambda: cb.on_start({"total_steps": 10, "resumed_from_step": 2}),
        lambda: cb.on_checkpoint(2, tmp_path / "step-00000002", {"train_loss": 0.9}),
    ):
        with pytest.raises(LeaseLost):
            write()
    assert _job_and_rows(engine, job_id) == before
    assert cb.stop_reason == "lease_lost" and keeper.lost.is_set()


def test_may_write_asks_the_database_even_after_a_fresh_renewal(engine: Engine, tmp_path: Path) -> None:
    """Before a checkpoint is written or renamed into place (a file, which no transaction fences)."""
    job_id, keeper, cb = _setup(engine, tmp_path)
    assert cb.may_write(2)
    assert acquire(engine, job_id, make_owner("w2@rescuer"), LEASE_S, now=int(time.time()) + LEASE_S + 1)
    keeper.last_renewed = time.monotonic()
    assert keeper.confirm()  # the cheap check is fooled ...
    with pytest.raises(LeaseLost):  # ... the one before a write is not
        cb.may_write(2)
