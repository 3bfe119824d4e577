"""The one Celery task, "qlora.run_job": take a job's lease, validate its files, train, publish.

The database is the source of truth (STYLE.md); the message carries only the job id, and every
state change is a conditional UPDATE that holds only while this process owns the job's lease
(worker/lease.py). A redelivered or duplicated message therefore does nothing, and a job resumed
after a lost worker continues from its last complete checkpoint (`train(..., resume=True)`).
Statuses follow OpenAI's job lifecycle: validating_files -> queued -> running -> succeeded |
failed | cancelled, with OpenAI's error codes where they exist (`invalid_training_file`,
`invalid_n_examples`) and ours beside them (`out_of_memory`, `time_limit_exceeded`,
`internal_error`). A user sees a one-line error; the traceback goes to the worker's log.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from sqlalchemy import Engine, select, update

from service.database import get_worker_engine
from service.db import Job, Worker
from service.queue import TASK_RUN_JOB
from service.settings import Settings, get_settings
from worker.app import app
from worker.errors import JobFailed
from worker.events import add_event, event_values
from service.db import ACTIVE_STATUSES
from worker.lease import acquire, make_owner, release, transition

log = logging.getLogger(__name__)

_jobs = Job.__table__
_workers = Worker.__table__

# A job whose worker died this many times (OOM killer, node loss) fails instead of looping:
# see Note: late acks and lost workers in service/queue.py.
MAX_ATTEMPTS = 5


@app.task(name=TASK_RUN_JOB, bind=True, ignore_result=True)
def run_job(self: Any, job_id: str) -> str:
    """Run job `job_id` if nobody else holds it. Returns what happened (for logs and tests)."""
    settings = get_settings()
    engine = get_worker_engine(settings.database_url, settings.lease_s)
    nodename = getattr(self.request, "hostname", None) or f"qlora@{socket.gethostname()}"
    return run_job_here(engine, settings, job_id, nodename)


def run_job_here(engine: Engine, settings: Settings, job_id: str, nodename: str) -> str:
    """The body of the task, callable without Celery (the lease makes it safe either way).

    Returns:
        "skipped" when another live worker holds the job or it is finished, else the job's
        status when this process let go of it ("lease_lost" when another worker took it over).
    """
    from worker.runner import LeaseKeeper

    owner = make_owner(nodename)
    if not acquire(engine, job_id, owner, settings.lease_s):
        log.info("job %s is finished or held by another worker; nothing to do", job_id)
        return "skipped"
    lease = LeaseKeeper(engine, job_id, owner, settings.lease_s, settings.heartbeat_s)
    lease.start()
    _set_current_job(engine, nodename, job_id)
    try:
        return _execute(engine, settings, job_id, owner, lease)
    finally:
        lease.stop()
        release(engine, job_id, owner)
        _set_current_job(engine, nodename, None)


def _execute(engine: Engine, settings: Settings, job_id: str, owner: str, lease: Any) -> str:
    job = _load(engine, job_id)
    try:
        if job.attempts > MAX_ATTEMPTS:
            raise JobFailed(
                "internal_error",
                f"The job was interrupted {job.attempts - 1} times (its worker process died); giving up. "
                "If the worker ran out of memory, lower batch_size, max_seq_length or lora_r.",
            )
        if job.cancel_requested_at is not None:
            return _finish_cancelled(engine, job_id, owner)
        if job.status == "validating_files":
            from worker.validation import validate_job_files

            validate_job_files(engine, settings, job, lambda msg, lvl="info": add_event(engine, job_id, msg, level=lvl))
            validated = event_values(job_id, "Files validated, moving job to queued state")
            if not transition(engine, job_id, owner, ("validating_files",), "queued", events=[validated]):
                return _status(engine, job_id)
        started = job.started_at or int(time.time())
        resumed = job.status == "running"
        started_event = event_values(job_id, "Fine-tuning job resumed" if resumed else "Fine-tuning job started")
        if not transition(engine, job_id, owner, ("queued", "running"), "running", started_at=started,
                          events=[started_event]):
            return _status(engine, job_id)
        from worker.training import train_job

        outcome = train_job(engine, settings, _load(engine, job_id), owner, lease, deadline=started + settings.job_time_limit_s)
        if outcome == "cancelled":
            return _finish_cancelled(engine, job_id, owner)
        if outcome == "time_limit":
            raise JobFailed(
                "time_limit_exceeded",
                f"The job ran longer than the time limit of {settings.job_time_limit_s} s "
                "(QLORA_JOB_TIME_LIMIT_S); its checkpoints are kept.",
            )
        return outcome
    except JobFailed as e:
        log.warning("job %s failed: %s: %s", job_id, e.code, e.message)
        _fail(engine, job_id, owner, e.code, e.message, e.param)
        return "failed"
    except Exception as e:  # last resort: the user gets one line, the log gets the traceback
        if not lease.confirm():  # e.g. its session ended while it was frozen (See Note: frozen lock holders)
            log.warning("job %s: %s: %s, after losing the lease; its new holder goes on", job_id, type(e).__name__, e)
            return "lease_lost"
        log.exception("job %s failed with an unexpected error", job_id)
        first_line = (str(e).strip().splitlines() or [""])[0][:500]
        _fail(engine, job_id, owner, "internal_error", f"{type(e).__name__}: {first_line}".rstrip(": "))
        return "failed"


def _load(engine: Engine, job_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(_jobs).where(_jobs.c.id == job_id)).one()


def _status(engine: Engine, job_id: str) -> str:
    return str(_load(engine, job_id).status)


def _fail(engine: Engine, job_id: str, owner: str, code: str, message: str, param: str | None = None) -> None:
    error = {"code": code, "message": message, "param": param}
    transition(engine, job_id, owner, ACTIVE_STATUSES, "failed", error=error, finished_at=int(time.time()),
               events=[event_values(job_id, message, level="error")])


def _finish_cancelled(engine: Engine, job_id: str, owner: str) -> str:
    transition(engine, job_id, owner, ACTIVE_STATUSES, "cancelled", finished_at=int(time.time()),
               events=[event_values(job_id, "Fine-tuning job cancelled")])
    return "cancelled"


def _set_current_job(engine: Engine, nodename: str, job_id: str | None) -> None:
    values: dict[str, Any] = {"current_job": job_id, "last_seen_at": int(time.time())}
    try:
        with engine.begin() as conn:
            conn.execute(update(_workers).where(_workers.c.id == nodename).values(**values))
    except Exception as e:  # bookkeeping only: never fail a job over it
        log.warning("could not record the current job of %s: %s", nodename, e)
