"""The reconciler: re-enqueue unfinished jobs whose message was lost, so no job is ever stranded.

A Celery message can vanish: the broker restarted without persistence, the API committed the job
but crashed before `enqueue_job`, a worker died and its message was acknowledged anyway. The
database still says the job is unfinished, so a periodic pass (the "reconciliation loop" of
Kubernetes controllers: compare desired state with observed state, act on the difference) sends
its id again. Re-sending is always safe (worker/lease.py decides who runs), but a job that
simply waits in the queue behind a long one must not pile up duplicates, so a worker reconciles
only while it has a free slot: an idle worker that sees an unheld job older than the grace
period knows that job's message is not in the queue it consumes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import Engine, and_, func, select, update

from service.db import Job, Worker
from service.settings import Settings
from service.db import ACTIVE_STATUSES
from worker.lease import lease_is_free

log = logging.getLogger(__name__)

_jobs = Job.__table__
_workers = Worker.__table__


def grace_s(settings: Settings) -> int:
    """How long after its last enqueue an unheld job is presumed lost (two reconcile periods)."""
    return max(2 * settings.reconcile_interval_s, 5)


def busy_slots(engine: Engine, nodename: str, now: int) -> int:
    """How many jobs processes of worker `nodename` hold live leases on."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(_jobs)
                .where(
                    _jobs.c.lease_owner.like(nodename.replace("%", r"\%").replace("_", r"\_") + "|%", escape="\\"),
                    _jobs.c.lease_expires_at >= now,
                    _jobs.c.status.in_(ACTIVE_STATUSES),
                )
            ).scalar_one()
        )


def reconcile_once(
    engine: Engine,
    settings: Settings,
    nodename: str,
    concurrency: int,
    enqueue: Callable[[str], None],
    now: int | None = None,
) -> list[str]:
    """One pass: re-enqueue lost jobs (up to this worker's free slots) and mark silent workers dead.

    Args:
        engine: the service database.
        settings: lease_s, heartbeat_s and reconcile_interval_s come from here.
        nodename: this worker's Celery node name (its leases are `nodename|...`).
        concurrency: how many jobs this worker runs at once.
        enqueue: sends a job id to the queue (`service.queue.enqueue_job`).
        now: the current Unix time (tests pass it).

    Returns:
        The ids of the jobs re-enqueued.
    """
    now = int(time.time()) if now is None else now
    _mark_dead_workers(engine, settings, now)
    free = concurrency - busy_slots(engine, nodename, now)
    if free <= 0:
        return []
    cutoff = now - grace_s(settings)
    last_sent = func.coalesce(_jobs.c.enqueued_at, _jobs.c.created_at)
    with engine.connect() as conn:
        rows = conn.execute(
            select(_jobs.c.id, _jobs.c.lease_owner, _jobs.c.lease_expires_at)
            .where(_jobs.c.status.in_(ACTIVE_STATUSES), last_sent < cutoff)
            .order_by(_jobs.c.seq)
            .limit(100)
        ).all()
    sent: list[str] = []
    for row in rows:
        if len(sent) >= free:
            break
        if not lease_is_free(row.lease_owner, row.lease_expires_at, now):
            continue
        # Claim the re-send in the row itself, so that two reconcilers never both send it.
        claim = (
            update(_jobs)
            .where(_jobs.c.id == row.id, _jobs.c.status.in_(ACTIVE_STATUSES), last_sent < cutoff)
            .values(enqueued_at=now)
        )
        with engine.begin() as conn:
            if conn.execute(claim).rowcount != 1:
                continue
        try:
            enqueue(row.id)
        except Exception as e:  # broker down: the claim expires after the grace period, then we retry
            log.warning("could not re-enqueue %s: %s", row.id, e)
            continue
        log.info("re-enqueued %s (no live lease, last sent before %d)", row.id, cutoff)
        sent.append(row.id)
    return sent


def _mark_dead_workers(engine: Engine, settings: Settings, now: int) -> None:
    silent_since = now - max(3 * settings.heartbeat_s, settings.lease_s)
    with engine.begin() as conn:
        conn.execute(
            update(_workers)
            .where(and_(_workers.c.alive.is_(True), _workers.c.last_seen_at < silent_since))
            .values(alive=False, current_job=None)
        )


__all__ = ["busy_slots", "grace_s", "reconcile_once"]
