"""Job leases: which worker process may run a job, decided by one atomic UPDATE on the job row.

See Note: job lease in service/db.py. The broker may deliver "run job X" twice (Redis
visibility timeout, a requeued message after a lost worker, the reconciler's re-enqueue), so the
database, not the broker, decides who runs: a worker takes the job by an UPDATE whose WHERE clause
holds only when nobody else holds a live lease, and renews it while it trains. The same pattern
is the "lease" of Chubby/etcd, reduced to a row and an expiry time.

An owner is `"<nodename>|<machine>|<pid>"`: a lease whose owner ran on this machine and whose
process is gone is stale at once (a restarted worker need not wait for the lease to expire).
One acquisition of the lease is a `Lease`: the owner and the job's `attempts` counter after the
acquire, the fencing token that every write of the holder carries (See Note: fencing tokens).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, and_, insert, or_, select, update

from service.db import ACTIVE_STATUSES, Job, JobEvent

log = logging.getLogger(__name__)


_jobs = Job.__table__
_events = JobEvent.__table__


class LeaseLost(RuntimeError):
    """This process no longer holds the job's lease: another worker took the job over."""


@dataclass(frozen=True)
class Lease:
    """One acquisition of a job's lease: who took it (`owner`) and which `attempt` it was.

    # Note: fencing tokens. A holder frozen past its lease (SIGSTOP, a swapping machine, a VM
    # paused by its host) wakes up with its lease taken over, and no check it makes beforehand
    # can stop it from writing if it is frozen right after the check. So a check is not enough:
    # every write the holder makes for the job carries its lease in the write itself, the way
    # Chubby's sequencers and Kleppmann's fencing tokens do. Status changes are an UPDATE whose
    # WHERE clause is `held()`; progress, events and checkpoint rows are written in a transaction
    # that first locks the job row through `fence()`, so a takeover commits either before the
    # write (which then writes nothing) or after it (when the write was still the holder's). A
    # holder frozen inside such a transaction keeps the row locked and the takeover waits for it
    # (PostgreSQL's idle_in_transaction_session_timeout bounds that wait); it never commits a
    # write after a takeover. The token is `attempts`, which every acquire increments: it names one
    # acquisition even when two of them have the same owner string (a pid reused, two containers
    # with the same host name), and it orders them, so the engine names its temp dirs by it and
    # removes only those of earlier attempts (See Note: publishing under a lease in
    # qlora_core/checkpoint.py).
    """

    job_id: str
    owner: str
    attempt: int

    def held(self) -> ColumnElement[bool]:
        """The WHERE clause "the job's row still names this acquisition"."""
        return and_(_jobs.c.id == self.job_id, _jobs.c.lease_owner == self.owner, _jobs.c.attempts == self.attempt)


def fence(conn: Connection, lease: Lease) -> bool:
    """Lock the job's row until `conn`'s transaction ends, if `lease` still holds it.

    Writes made after a True in the same transaction commit only while the lease is held: a
    takeover's UPDATE waits for this transaction (See Note: fencing tokens).

    Returns:
        False when another acquisition holds the job (nothing is locked).
    """
    stmt = update(_jobs).where(lease.held()).values(lease_owner=lease.owner)  # a no-op write: it takes the row lock
    return conn.execute(stmt).rowcount == 1


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


def acquire(engine: Engine, job_id: str, owner: str, lease_s: int, now: int | None = None) -> Lease | None:
    """Take the lease on an unfinished job, or renew it if `owner` already holds it.

    Args:
        engine: the service database.
        job_id: the job to take.
        owner: this process's owner string (`make_owner`).
        lease_s: seconds the lease lasts without a renewal.
        now: the current Unix time (tests pass it to simulate expiry).

    Returns:
        The lease `owner` now holds (`attempts` was incremented and names it); None when the job
        is finished, unknown, or held by another live worker.
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
            return _taken(conn, job_id, owner)
        holder = conn.execute(select(_jobs.c.lease_owner).where(_jobs.c.id == job_id)).scalar_one_or_none()
    if holder is None or not owner_is_dead_here(holder):
        return None
    # The holder died on this machine: take over, but only from that exact holder (a third
    # process may have won the race in between).
    with engine.begin() as conn:
        stmt = (
            update(_jobs)
            .where(_jobs.c.id == job_id, _jobs.c.status.in_(ACTIVE_STATUSES), _jobs.c.lease_owner == holder)
            .values(**values)
        )
        lease = _taken(conn, job_id, owner) if conn.execute(stmt).rowcount == 1 else None
    if lease is not None:
        log.info("took over %s from dead process %s", job_id, holder)
    return lease


def _taken(conn: Connection, job_id: str, owner: str) -> Lease:
    """The lease just won in `conn`'s transaction (the row is still locked: `attempts` is ours)."""
    attempt = conn.execute(select(_jobs.c.attempts).where(_jobs.c.id == job_id)).scalar_one()
    return Lease(job_id, owner, int(attempt))


def renew(engine: Engine, lease: Lease, lease_s: int, now: int | None = None) -> bool:
    """Extend the lease; False when `lease` no longer holds the job (it expired and was taken over)."""
    now = int(time.time()) if now is None else now
    stmt = update(_jobs).where(lease.held()).values(lease_expires_at=now + lease_s)
    with engine.begin() as conn:
        return conn.execute(stmt).rowcount == 1


def release(engine: Engine, lease: Lease) -> None:
    """Give the lease up (no-op when `lease` no longer holds the job)."""
    stmt = update(_jobs).where(lease.held()).values(lease_owner=None, lease_expires_at=None)
    with engine.begin() as conn:
        conn.execute(stmt)


def transition(
    engine: Engine,
    lease: Lease,
    from_statuses: tuple[str, ...],
    to_status: str,
    events: list[dict[str, Any]] | None = None,
    **values: Any,
) -> bool:
    """Move the job to `to_status` only if `lease` holds it and it is in one of `from_statuses`.

    The condition makes a status change lose, not overwrite, a concurrent change by the API
    (a cancel that already marked a queued job `cancelled`) or by a worker that took over.
    `events` (rows from `worker.events.event_values`) are written in the same transaction, so
    a reader who sees the new status also sees the events that announce it.

    Returns:
        True when the row changed.
    """
    stmt = update(_jobs).where(lease.held(), _jobs.c.status.in_(from_statuses)).values(status=to_status, **values)
    with engine.begin() as conn:
        if conn.execute(stmt).rowcount != 1:
            return False
        if events:
            conn.execute(insert(_events), events)
    return True
