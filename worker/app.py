"""The worker's Celery app (`celery -A worker.app worker` also works): `service.queue`'s
configuration plus the task module, and the per-child set-up of a prefork pool.

See Note: fork and connection pools — the parent process forks a fresh child for every job
(`worker_max_tasks_per_child=1`); a child must not reuse the parent's pooled database
connections (two processes on one socket corrupt the protocol), so each child replaces the pool
at start-up without closing the parent's sockets (SQLAlchemy's documented `dispose(close=False)`).
"""

from __future__ import annotations

import logging
import os

from celery.signals import worker_process_init

from service.queue import make_celery
from service.settings import get_settings

log = logging.getLogger(__name__)

# Nothing in a worker may reach for a model hub (REFERENCES: "Running it here").
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = make_celery(get_settings())
# The worker imports the task modules when it boots (tasks are sent by name, never by import):
# "qlora.run_job" and "qlora.export_merged".
app.conf.include = ["worker.tasks", "worker.export"]


@worker_process_init.connect
def _fresh_child(**_: object) -> None:
    """See Note: fork and connection pools; and a job child never outlives its worker (See Note:
    owned children in service/lifetime.py): a killed worker takes its job with it, and the job
    resumes from its last checkpoint under the next lease holder."""
    from service.database import get_worker_engine
    from service.lifetime import die_with_parent

    die_with_parent(os.getppid(), thread_safe=True)
    settings = get_settings()
    get_worker_engine(settings.database_url, settings.lease_s).dispose(close=False)

