"""Job leases: which worker process may run a job, decided by one atomic UPDATE on the job row.

See Note: job lease in service/db.py. The broker may deliver "run job X" twice (Redis
visibility timeout, a requeued message after a lost worker, the reconciler's re-enqueue), so the
database, not the broker, decides who runs: a worker takes the job by an UPDATE whose WHERE clause
holds only when nobody else holds a live lease, and renews it while it trains. The same pattern
is the "lease" of Chubby/etcd, reduced to a row and an expiry time.

An owner is `"<nodename>|<machine>|<pid>"`: a lease whose owner ran on this machine and whose
process is gone is stale at once (a restarted worker need not wait for the lease to expire).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from sqlalchemy import Engine, insert, or_, select, update

from service.db import ACTIVE_STATUSES, Job, JobEvent

log = logging.getLogger(__name__)


_jobs = Job.__table__
_events = JobEvent.__table__


def make_owner(nodename: str, pid: int | None = None) -> str:
    """The lease-owner string of the process `pid` (default: this one) in worker `nodename`."""
    return f"{nodename}|{socket.gethostname()}|{os.getpid() if pid is None else pid}"


def parse_owner(owner: str) -> tuple[str, str, int] | None:
    """Split an owner string into (nodename, machine, pid); None when it is not one of ours."""
    parts = owner.rsplit("|", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def owner_is_dead_here(owner: str | None) -> bool:
    """True when `owner` ran on this machine and its process no longer exists."""
    parsed = parse_owner(owner) if owner else None
    if parsed is None:
        return False
    _, machine, pid = parsed
    return machine == socket.gethostname() and not _pid_alive(pid)


def lease_is_free(owner: str | None, expires_at: int | None, now: int) -> bool:
    """True when nobody holds the lease: empty, expired, or held by a dead process on this machine."""
    return owner is None or expires_at is None or expires_at < now or owner_is_dead_here(owner)


def acquire(engine: Engine, job_id: str, owner: str, lease_s: int, now: int | None = None) -> bool:
    """Take the lease on an unfinished job, or renew it if `owner` already holds it.

    Args:
        engine: the service database.
        job_id: the job to take.
        owner: this process's owner string (`make_owner`).
        lease_s: seconds the lease lasts without a renewal.
        now: the current Unix time (tests pass it to simulate expiry).

    Returns:
        True when `owner` now holds the lease (and `attempts` was incremented); False when the
        job is finished, unknown, or held by another live worker.
    """
    now = int(time.time()) if now is None else now
    values: dict[str, Any] = {
        "lease_owner": owner,
        "lease_expires_at": now + lease_s,
        "attempts": _jobs.c.attempts + 1,
    }
    stmt = (
        update(_jobs)
        .where(_jobs.c.id == job_id, _jobs.c.status.in_(ACTIVE_STATUSES))
        .where(
            or_(
                _jobs.c.lease_owner.is_(None),
                _jobs.c.lease_expires_at.is_(None),
                _jobs.c.lease_expires_at < now,
                _jobs.c.lease_owner == owner,
            )
        )
        .values(**values)
    )
    with engine.begin() as conn:
        if conn.execute(stmt).rowcount == 1:
            return True
        holder = conn.execute(select(_jobs.c.lease_owner).where(_jobs.c.id == job_id)).scalar_one_or_none()
    if holder is None or not owner_is_dead_here(holder):
        return False
    # The holder died on this machine: take over, but only from that exact holder (a third
    # process may have won the race in between).
    with engine.begin() as conn:
        stmt = (
            update(_jobs)
            .where(_jobs.c.id == job_id, _jobs.c.status.in_(ACTIVE_STATUSES), _jobs.c.lease_owner == holder)
            .values(**values)
        )
        taken = conn.execute(stmt).rowcount == 1
    if taken:
        log.info("took over %s from dead process %s", job_id, holder)
    return taken


def renew(engine: Engine, job_id: str, owner: str, lease_s: int, now: int | None = None) -> bool:
    """Extend the lease; False when `owner` no longer holds it (it expired and was taken over)."""
    now = int(time.time()) if now is None else now
    stmt = (
        update(_jobs)
        .where(_jobs.c.id == job_id, _jobs.c.lease_owner == owner)
        .values(lease_expires_at=now + lease_s)
    )
    with engine.begin() as conn:
        return conn.execute(stmt).rowcount == 1


def release(engine: Engine, job_id: str, owner: str) -> None:
    """Give the lease up (no-op when `owner` does not hold it)."""
    stmt = (
        update(_jobs)
        .where(_jobs.c.id == job_id, _jobs.c.lease_owner == owner)
        .values(lease_owner=None, lease_expires_at=None)
    )
    with engine.begin() as conn:
        conn.execute(stmt)


def transition(
    engine: Engine,
    job_id: str,
    owner: str,
    from_statuses: tuple[str, ...],
    to_status: str,
    events: list[dict[str, Any]] | None = None,
    **values: Any,
) -> bool:
    """Move the job to `to_status` only if `owner` holds it and it is in one of `from_statuses`.

    The condition makes a status change lose, not overwrite, a concurrent change by the API
    (a cancel that already marked a queued job `cancelled`) or by a worker that took over.
    `events` (rows from `worker.events.event_values`) are written in the same transaction, so
    a reader who sees the new status also sees the events that announce it.

    Returns:
        True when the row changed.
    """
    stmt = (
        update(_jobs)
        .where(_jobs.c.id == job_id, _jobs.c.lease_owner == owner, _jobs.c.status.in_(from_statuses))
        .values(status=to_status, **values)
    )
    with engine.begin() as conn:
        if conn.execute(stmt).rowcount != 1:
            return False
        if events:
            conn.execute(insert(_events), events)
    return True
