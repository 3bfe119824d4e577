"""Job events: a metrics step replayed after a resume is recorded once, on both backends."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, func, select

from service.db import JobEvent
from tests.worker.conftest import make_job
from worker.events import add_event

_events = JobEvent.__table__


def _count(engine: Engine, job_id: str, **where: str) -> int:
    q = select(func.count()).select_from(_events).where(_events.c.job_id == job_id)
    for k, v in where.items():
        q = q.where(_events.c[k] == v)
    with engine.connect() as conn:
        return int(conn.execute(q).scalar_one())


def test_metrics_step_recorded_once(engine: Engine) -> None:
    job = make_job(engine)
    data = {"step": 3, "train_loss": 1.25, "train_mean_token_accuracy": 0.5, "total_steps": 10}
    assert add_event(engine, job, "Step 3/10", type="metrics", data=data, dedup_key="metrics:3")
    # A resumed run logs step 3 again with slightly different numbers: the first one stands.
    assert not add_event(engine, job, "Step 3/10", type="metrics", data={**data, "train_loss": 1.3}, dedup_key="metrics:3")
    assert add_event(engine, job, "Step 4/10", type="metrics", data={**data, "step": 4}, dedup_key="metrics:4")
    assert _count(engine, job, type="metrics") == 2
    with engine.connect() as conn:
        stored = conn.execute(select(_events.c.data).where(_events.c.dedup_key == "metrics:3", _events.c.job_id == job)).scalar_one()
    assert stored["train_loss"] == 1.25


def test_same_step_of_two_jobs_are_distinct(engine: Engine) -> None:
    a, b = make_job(engine), make_job(engine)
    assert add_event(engine, a, "s", type="metrics", data={"step": 1}, dedup_key="metrics:1")
    assert add_event(engine, b, "s", type="metrics", data={"step": 1}, dedup_key="metrics:1")


def test_plain_messages_are_never_deduplicated(engine: Engine) -> None:
    job = make_job(engine)
    for _ in range(3):
        assert add_event(engine, job, "Fine-tuning job resumed")
    assert _count(engine, job, type="message") == 3


def test_bad_level_is_refused(engine: Engine) -> None:
    job = make_job(engine)
    with pytest.raises(ValueError, match="'fatal'"):
        add_event(engine, job, "x", level="fatal")
