"""Engine and session factory for SQLite (embedded) and PostgreSQL (production).

See Note: SQLite shared by processes — the API and the worker are separate processes writing
the same SQLite file, so every connection turns on WAL and a busy timeout; without them
concurrent writes fail with "database is locked".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, idle_in_transaction_s: int | None = None) -> Engine:
    """Create an engine for `url`, with SQLite tuned for several processes.

    Args:
        url: the database URL.
        idle_in_transaction_s: on PostgreSQL, the server ends a session of this engine that sits
            inside a transaction for longer than this (See Note: frozen lock holders); SQLite
            ignores it.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    connect_args: dict[str, object] = {"connect_timeout": 5}
    if idle_in_transaction_s is not None:
        connect_args["options"] = f"-c idle_in_transaction_session_timeout={int(idle_in_transaction_s * 1000)}"
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args)


@lru_cache(maxsize=8)
def get_engine(url: str, idle_in_transaction_s: int | None = None) -> Engine:
    return make_engine(url, idle_in_transaction_s)


def get_worker_engine(url: str, lease_s: int) -> Engine:
    """The engine a worker process uses: its sessions end when stuck inside a transaction for half
    a lease.

    # Note: frozen lock holders
    # A worker's transactions last milliseconds, but a worker process can be frozen in the middle
    # of one (SIGSTOP, a VM paused, a swap storm) after its UPDATE of the job's row and before its
    # COMMIT. PostgreSQL then keeps that row locked for as long as the process is frozen, and the
    # worker that would take the job over once the lease expires blocks on the same row forever.
    # `idle_in_transaction_session_timeout` makes the server end such a session after half a
    # lease, which rolls its transaction back and frees the row before the lease runs out; the
    # frozen process, woken, finds its connection gone (SQLAlchemyError), and its lease check
    # treats that as a lost lease once the lease would have expired (worker/runner.py). The API
    # keeps the plain engine: its request sessions may legitimately idle while streaming.
    """
    return get_engine(url, max(1, lease_s // 2))


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
