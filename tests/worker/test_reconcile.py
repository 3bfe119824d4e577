"""The reconciler re-sends jobs that nobody holds, once per grace period, only while it has room."""

from __future__ import annotations

import time

from sqlalchemy import Engine, select

from service.db import Job
from service.settings import Settings
from tests.worker.conftest import make_job
from worker.lease import acquire, make_owner
from worker.reconcile import grace_s, reconcile_once

NODE = "qlora@test-reconcile"


def _settings(tmp_path) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(data_dir=tmp_path, reconcile_interval_s=10, lease_s=60, heartbeat_s=10)


def _active_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        rows = conn.execute(select(Job.__table__.c.id).where(Job.__table__.c.status.in_(("validating_files", "queued", "running"))))
        return {r.id for r in rows}


def _drain(engine: Engine) -> None:
    """Finish every job earlier tests left (the database is shared within a module)."""
    from sqlalchemy import update

    with engine.begin() as conn:
        conn.execute(update(Job.__table__).values(status="succeeded"))


def test_lost_message_is_resent_once_per_grace_period(engine: Engine, tmp_path) -> None:
    _drain(engine)
    settings = _settings(tmp_path)
    t0 = int(time.time())
    job = make_job(engine, created_at=t0, enqueued_at=t0)
    sent: list[str] = []
    # Just enqueued: its message is presumably on its way.
    assert reconcile_once(engine, settings, NODE, 1, sent.append, now=t0 + 1) == []
    later = t0 + grace_s(settings) + 1
    assert reconcile_once(engine, settings, NODE, 1, sent.append, now=later) == [job]
    # Sent again just now: not again until another grace period has passed.
    assert reconcile_once(engine, settings, NODE, 1, sent.append, now=later + 1) == []
    assert reconcile_once(engine, settings, NODE, 1, sent.append, now=later + grace_s(settings) + 1) == [job]
    assert sent == [job, job]


def test_live_lease_is_left_alone_and_expired_one_resent(engine: Engine, tmp_path) -> None:
    _drain(engine)
    settings = _settings(tmp_path)
    t0 = int(time.time())
    job = make_job(engine, status="running", created_at=t0 - 1000, enqueued_at=t0 - 1000)
    assert acquire(engine, job, make_owner("other@elsewhere"), settings.lease_s, now=t0)
    sent: list[str] = []
    assert reconcile_once(engine, settings, NODE, 1, sent.append, now=t0 + 5) == []
    # Its holder went silent: once the lease expires the job is sent again (and resumes).
    assert reconcile_once(engine, settings, NODE, 1, sent.append, now=t0 + settings.lease_s + 1) == [job]


def test_busy_worker_does_not_pile_up_duplicates(engine: Engine, tmp_path) -> None:
    _drain(engine)
    settings = _settings(tmp_path)
    t0 = int(time.time())
    running = make_job(engine, status="running", created_at=t0 - 1000, enqueued_at=t0 - 1000)
    waiting = make_job(engine, created_at=t0 - 1000, enqueued_at=t0 - 1000)
    assert acquire(engine, running, make_owner(NODE), settings.lease_s, now=t0)
    sent: list[str] = []
    assert reconcile_once(engine, settings, NODE, 1, sent.append, now=t0 + 5) == []
    # With a second slot free the waiting job is sent; the held one never is.
    assert reconcile_once(engine, settings, NODE, 2, sent.append, now=t0 + 5) == [waiting]
    assert _active_ids(engine) == {running, waiting}


def test_two_reconcilers_send_a_job_once(engine: Engine, tmp_path) -> None:
    _drain(engine)
    settings = _settings(tmp_path)
    t0 = int(time.time())
    job = make_job(engine, created_at=t0 - 1000, enqueued_at=None)
    sent: list[str] = []
    assert reconcile_once(engine, settings, "qlora@a", 1, sent.append, now=t0) == [job]
    assert reconcile_once(engine, settings, "qlora@b", 1, sent.append, now=t0) == []
    assert sent == [job]
