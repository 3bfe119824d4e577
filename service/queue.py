"""The Celery app that carries "go train job X" (and "build job X's merged model") to a worker (torch-free).

The database is the one source of truth for a job; a message carries only the job id and may be
delivered twice or lost without harm: the worker takes a lease on the job row before it trains
(see Note: job lease in service/db.py) and the reconciler re-enqueues jobs nobody holds
(worker/reconcile.py). The configuration follows Celery's advice for long tasks (docs,
"Tasks: acks_late", "Optimizing: prefetch limits") and REFERENCES.md "Celery for long GPU jobs".

Embedded mode uses kombu's SQLAlchemy transport on a SQLite file (`sqla+sqlite:///...`), so a
real Celery worker runs with no broker server; production uses Redis.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache

from celery import Celery

from service.settings import Settings, get_settings

log = logging.getLogger(__name__)

TASK_RUN_JOB = "qlora.run_job"
# Build a succeeded job's merged 16-bit model archive (worker/export.py); same queue, same workers.
TASK_EXPORT_MERGED = "qlora.export_merged"
QUEUE = "qlora"

# Note: redis visibility timeout. With late acks, Redis re-delivers a message that is not
# acknowledged within `visibility_timeout` (default 1 h), so a 3-hour job would be started again
# every hour (celery#5935, #3430). We set it far beyond any job (a week) and, more importantly,
# make redelivery harmless: a second copy finds the job's lease live and returns at once.
VISIBILITY_TIMEOUT_S = 7 * 24 * 3600


def make_celery(settings: Settings) -> Celery:
    """Build a Celery app configured from `settings` (no tasks are imported here).

    Args:
        settings: the service settings; `broker_url` picks Redis or the embedded SQLite broker.

    Returns:
        A configured Celery app; `worker.app` registers the tasks on it.
    """
    broker = settings.broker_url
    if broker.startswith("sqla+sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = Celery("qlora", broker=broker, set_as_current=False)
    transport_options: dict[str, object] = {}
    if broker.startswith(("redis", "rediss")):
        transport_options["visibility_timeout"] = VISIBILITY_TIMEOUT_S  # See Note: redis visibility timeout
    elif broker.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands these options to `create_engine`: the API, the
        # worker and the reconciler all write the broker file, so wait on SQLite's lock
        # rather than fail with "database is locked".
        transport_options["connect_args"] = {"timeout": 30}
    app.conf.update(
        task_default_queue=QUEUE,
        task_routes={TASK_RUN_JOB: {"queue": QUEUE}, TASK_EXPORT_MERGED: {"queue": QUEUE}},
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        # Note: late acks and lost workers. A message is acknowledged only after the task
        # returns, and one whose worker child dies (OOM killer, SIGKILL, power loss) is
        # *rejected and requeued* rather than acknowledged. Celery warns this can loop when the
        # task itself kills the worker; here it cannot run away, because the task first takes
        # the job's DB lease and records `attempts`, and the task marks the job failed after
        # MAX_ATTEMPTS (worker/tasks.py). The DB decides who runs the job, the broker only
        # reminds workers that it exists.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A fresh child per job: frees the CUDA context and any leaked memory between jobs.
        worker_max_tasks_per_child=1,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        broker_heartbeat=0 if broker.startswith("sqla+") else None,
    )
    return app


@lru_cache(maxsize=4)
def _cached_app(broker_url: str) -> Celery:
    return make_celery(get_settings())


def celery_app() -> Celery:
    """The process-wide Celery app for the current settings (cached per broker URL)."""
    return _cached_app(get_settings().broker_url)


def enqueue_job(job_id: str) -> None:
    """Send "train job `job_id`" to the workers' queue; the message carries only the id.

    Args:
        job_id: the `ftjob-...` id of a job row already committed to the database.

    Raises:
        kombu.exceptions.OperationalError: the broker cannot be reached (the reconciler will
            enqueue the job later, so callers may log this and carry on).
    """
    celery_app().send_task(TASK_RUN_JOB, args=[job_id], queue=QUEUE, ignore_result=True)
    log.info("enqueued %s", job_id)


def enqueue_export(job_id: str) -> None:
    """Send "build the merged model of job `job_id`" to the workers' queue (only the id travels).

    Args:
        job_id: the `ftjob-...` id of a succeeded job whose `merged_export` request is committed.

    Raises:
        kombu.exceptions.OperationalError: the broker cannot be reached (the request is retried
            by the next poll; see Note: merged export requests in api/routes/job_outputs.py).
    """
    celery_app().send_task(TASK_EXPORT_MERGED, args=[job_id], queue=QUEUE, ignore_result=True)
    log.info("enqueued the merged export of %s", job_id)


def broker_reachable(timeout: float = 2.0) -> bool:
    """True when a connection to the broker can be opened within `timeout` seconds."""
    app = celery_app()
    result: list[bool] = []

    def probe() -> None:
        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=timeout)
                # The SQLAlchemy transport connects lazily: touching the channel opens the file.
                conn.default_channel
            result.append(True)
        except Exception as e:  # kombu raises many transport-specific types; any means "not reachable"
            log.debug("broker not reachable: %s", e)
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return bool(result and result[0])
