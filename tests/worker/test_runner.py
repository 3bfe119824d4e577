"""`DbCallback` and `LeaseKeeper` on real SQLite and PostgreSQL: a holder that stalled past its
lease publishes nothing once it wakes up (See Note: stalled holders in worker/runner.py).

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
    owner = make_owner("w1@stalled")
    assert acquire(engine, job_id, owner, LEASE_S)
    with engine.connect() as conn:
        tenant = conn.execute(select(Job.__table__.c.tenant_id).where(Job.__table__.c.id == job_id)).scalar_one()
    keeper = LeaseKeeper(engine, job_id, owner, LEASE_S, HEARTBEAT_S)  # not started: the test drives it
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
    assert cb.should_stop(2) and cb.stop_reason == "lease_lost"
    assert _metrics_events(engine, job_id) == [1]


def _checkpoint_rows(engine: Engine, job_id: str) -> list:
    t = Checkpoint.__table__
    with engine.connect() as conn:
        return list(conn.execute(select(t).where(t.c.job_id == job_id).order_by(t.c.step_number)))


def test_a_checkpoint_its_writer_could_not_record_is_recorded_by_the_run_that_resumes_from_it(
        engine: Engine, tmp_path: Path) -> None:
    """The holder made checkpoint 2 complete on disk and froze before recording it; its job was
    taken over. Woken, it records nothing; the run that takes over resumes from that checkpoint and
    records it, once, so the job's checkpoint list names what it really resumed from."""
    job_id, keeper, cb = _setup(engine, tmp_path)
    done = tmp_path / "checkpoints" / "step-00000002"
    done.mkdir(parents=True)
    (done / "state.pt").write_bytes(b"saved")
    keeper.last_renewed -= LEASE_S + 1
    rescuer = make_owner("w2@rescuer")
    assert acquire(engine, job_id, rescuer, LEASE_S, now=int(time.time()) + LEASE_S + 1)
    with pytest.raises(LeaseLost):
        cb.on_checkpoint(2, done, {"train_loss": 0.9})
    assert _checkpoint_rows(engine, job_id) == []

    resumed = DbCallback(engine, job_id, "ft:tiny:acme::x", cb.tenant_id, tmp_path,
                         LeaseKeeper(engine, job_id, rescuer, LEASE_S, HEARTBEAT_S), deadline=math.inf)
    resumed.on_resumed(2, done, {"step": 2, "train_loss": 0.9, "elapsed_s": 3.0})
    resumed.on_resumed(2, done, {"step": 2, "train_loss": 0.9})  # resumed again from it: no second row
    rows = _checkpoint_rows(engine, job_id)
    assert [(r.step_number, r.fine_tuned_model_checkpoint, r.state_path) for r in rows] == [
        (2, "ft:tiny:acme::x:ckpt-step-2", "checkpoints/step-00000002/state.pt")]
    assert rows[0].metrics["train_loss"] == 0.9 and rows[0].tenant_id == cb.tenant_id
