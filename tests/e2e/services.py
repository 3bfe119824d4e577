"""Private PostgreSQL databases and Redis db numbers for tests that need the real servers.

CI (`.ci/run`) runs Redis and PostgreSQL on 127.0.0.1 and sets QLORA_REQUIRE_SERVICES=1: there a
missing server, or no Redis db number to be had, fails the test. Elsewhere those tests skip. Every
run gets its own database (`CREATE DATABASE qlora_t_<random>`) and its own empty Redis db number,
so concurrent runs and other engineers' tests never see each other's rows or messages.

Note: Redis db claims. A run marks the db number it uses with a claim naming its owner (machine,
pid, a random token) and keeps a lease key alive beside it while it runs. A run killed before its
cleanup leaves its claim and its broker's keys behind; that db is stale, flushed and taken over,
as soon as the owner's pid is gone (owner on this machine) or once its lease has lapsed (anywhere:
nothing renews it). A db holding data without a claim belongs to someone else and is never touched.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    import redis

PG_ADMIN_URL = os.environ.get("QLORA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("QLORA_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def fail_or_skip(msg: str) -> NoReturn:
    """Fail under QLORA_REQUIRE_SERVICES=1 (CI), skip elsewhere."""
    if os.environ.get("QLORA_REQUIRE_SERVICES") == "1":
        pytest.fail(msg + " and QLORA_REQUIRE_SERVICES=1")
    pytest.skip(msg)


def require_or_skip(name: str, host: str, port: int) -> None:
    """Fail (CI) or skip (elsewhere) when `name` is not listening on host:port."""
    if not _reachable(host, port):
        fail_or_skip(f"{name} is not reachable on {host}:{port}")


@contextmanager
def private_postgres() -> Iterator[str]:
    """Create an empty database on the test server; yield its SQLAlchemy URL; drop it after."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = make_url(PG_ADMIN_URL)
    require_or_skip("PostgreSQL", admin.host or "127.0.0.1", admin.port or 5432)
    name = "qlora_t_" + secrets.token_hex(6)
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        from service.database import get_engine

        get_engine.cache_clear()  # engines of the private database hold connections: drop them
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


# See Note: Redis db claims.
DB_NUMBERS = range(4, 16)  # the low numbers are the usual defaults of other tools
CLAIM_KEY = "qlora-test-claim"
LEASE_KEY = "qlora-test-lease"
LEASE_S = 60
CLAIM_WAIT_S = LEASE_S + 10  # with every db held, wait this long for a lapsed lease before giving up

# Claim an empty db: the emptiness check and both writes in one step, so two runs never share one.
_CLAIM_EMPTY = """
if redis.call('DBSIZE') ~= 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return 1
"""
# Take over a stale claim, only if it is still the one judged stale (two runs may judge it at once).
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('FLUSHDB')
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('FLUSHDB')
return 1
"""


def machine_id() -> str:
    """This machine, as pids are numbered: host name, boot and pid namespace (containers share a host name)."""
    parts = [socket.gethostname()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(read())
        except OSError:
            parts.append("")
    return "/".join(parts)


def claim_value(pid: int, machine: str | None = None) -> str:
    """The claim a run with `pid` on `machine` (default: this one) writes; unique per call."""
    return json.dumps({"machine": machine or machine_id(), "pid": pid, "token": secrets.token_hex(8)})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def claim_is_stale(claim: bytes, lease_alive: bool) -> bool:
    """Whether a claim's owner is gone (see Note: Redis db claims)."""
    if not lease_alive:
        return True  # nothing renewed it for LEASE_S: the owner is dead or frozen (or an old-style claim)
    try:
        owner = json.loads(claim)
        return owner["machine"] == machine_id() and not _pid_alive(int(owner["pid"]))
    except (ValueError, KeyError, TypeError):
        return False  # unreadable but leased: leave it to its lease


def _try_claim(r: redis.Redis, mine: str) -> bool:
    if r.eval(_CLAIM_EMPTY, 2, CLAIM_KEY, LEASE_KEY, mine, LEASE_S):
        return True
    with r.pipeline() as pipe:  # MULTI: the claim and its lease as of one instant
        claim, lease_alive = pipe.get(CLAIM_KEY).exists(LEASE_KEY).execute()
    if claim is None or not claim_is_stale(claim, bool(lease_alive)):
        return False  # someone else's data, or a live run's
    return bool(r.eval(_TAKE_OVER, 2, CLAIM_KEY, LEASE_KEY, claim, mine, LEASE_S))


def _keep_lease(r: redis.Redis, mine: str, stop: threading.Event) -> None:
    import redis

    while not stop.wait(LEASE_S / 6):
        try:
            if not r.eval(_RENEW, 2, CLAIM_KEY, LEASE_KEY, mine, LEASE_S):
                return  # taken over (we stalled past the lease): it is not ours to renew
        except redis.ConnectionError:
            continue  # a Redis restart: renew on the next beat


@contextmanager
def private_redis() -> Iterator[str]:
    """Yield a `redis://host:port/N` URL of an empty db number; flush it after.

    Raises (through pytest): a failure under QLORA_REQUIRE_SERVICES=1, else a skip, when Redis is
    down or every db number in DB_NUMBERS stays held by a live run or someone's data for CLAIM_WAIT_S.
    """
    import redis

    base = REDIS_URL.rstrip("/")
    host, _, port = base.split("//", 1)[1].partition(":")
    require_or_skip("Redis", host, int(port or 6379))
    mine = claim_value(os.getpid())
    deadline = time.monotonic() + CLAIM_WAIT_S
    claimed = None
    while claimed is None:
        for n in secrets.SystemRandom().sample(list(DB_NUMBERS), len(DB_NUMBERS)):
            r = redis.Redis.from_url(f"{base}/{n}")
            if _try_claim(r, mine):
                claimed = n, r
                break
            r.close()
        else:
            if time.monotonic() >= deadline:
                fail_or_skip(f"no Redis db number in {DB_NUMBERS} is free: each is held by a live run or "
                             f"holds someone's data (waited {CLAIM_WAIT_S} s for a lease to lapse)")
            time.sleep(1)
    n, r = claimed
    stop = threading.Event()
    keeper = threading.Thread(target=_keep_lease, args=(r, mine, stop), name=f"redis-lease-{n}", daemon=True)
    keeper.start()
    try:
        yield f"{base}/{n}"
    finally:
        stop.set()
        keeper.join()
        r.eval(_RELEASE, 2, CLAIM_KEY, LEASE_KEY, mine)
        r.close()
