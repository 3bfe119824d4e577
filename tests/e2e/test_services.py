"""The private Redis db numbers of tests/e2e/services.py: a killed run's claim never costs a db, a live
run's claim is respected, and under QLORA_REQUIRE_SERVICES=1 (CI) nothing is ever skipped.

Each test first takes a db number through `private_redis` itself, then narrows `DB_NUMBERS` to
that one db and plays the other run on it, so the real Redis is used and no other run's db is
touched.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis

from tests.e2e import services
from tests.e2e.services import CLAIM_KEY, LEASE_KEY, claim_value, private_redis


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


@pytest.fixture()
def one_db(monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    """A db number of our own, and `private_redis` narrowed to it with no waiting."""
    with private_redis() as url:
        monkeypatch.setattr(services, "DB_NUMBERS", [int(url.rsplit("/", 1)[1])])
        monkeypatch.setattr(services, "CLAIM_WAIT_S", 0)
        r = redis.Redis.from_url(url)
        try:
            yield r
        finally:
            r.flushdb()  # whoever holds it now, the db is ours to clean
            r.close()


@pytest.mark.parametrize("left_behind", [
    "killed_here",  # a run killed on this machine: its pid is gone, its lease still running
    "killed_elsewhere",  # a run killed on another machine: its lease lapsed
    "old_style",  # a claim written before claims had leases
])
def test_a_killed_runs_claim_is_taken_over(one_db: redis.Redis, monkeypatch: pytest.MonkeyPatch,
                                           left_behind: str) -> None:
    monkeypatch.setenv("QLORA_REQUIRE_SERVICES", "1")
    if left_behind == "killed_here":
        stale = claim_value(_dead_pid())
        one_db.set(LEASE_KEY, stale, ex=600)
    elif left_behind == "killed_elsewhere":
        stale = claim_value(1, machine="another-machine")
        one_db.delete(LEASE_KEY)
    else:
        stale = "1"
        one_db.delete(LEASE_KEY)
    one_db.set(CLAIM_KEY, stale)
    one_db.set("_kombu.binding.celery", "the killed run's broker keys")
    try:
        with private_redis() as url:
            assert int(url.rsplit("/", 1)[1]) == one_db.get_connection_kwargs()["db"]
            assert one_db.exists("_kombu.binding.celery") == 0  # flushed before it was handed over
            assert one_db.get(CLAIM_KEY) not in (None, stale.encode()) and one_db.ttl(LEASE_KEY) > 0
    except pytest.skip.Exception as e:
        pytest.fail(f"a stale claim ({left_behind}) made the test skip: {e}")


def test_a_live_claim_and_someone_elses_data_are_never_taken(one_db: redis.Redis,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    live = one_db.get(CLAIM_KEY)  # held by this process, lease renewed: a live run
    monkeypatch.setenv("QLORA_REQUIRE_SERVICES", "1")
    try:
        with pytest.raises(pytest.fail.Exception, match="no Redis db number"):
            with private_redis():
                pass
    except pytest.skip.Exception as e:  # a skip escaping here would report this test as skipped
        pytest.fail(f"skipped under QLORA_REQUIRE_SERVICES=1: {e}")
    monkeypatch.delenv("QLORA_REQUIRE_SERVICES")
    with pytest.raises(pytest.skip.Exception, match="no Redis db number"):
        with private_redis():
            pass
    assert one_db.get(CLAIM_KEY) == live
    one_db.delete(CLAIM_KEY, LEASE_KEY)
    one_db.set("someone-elses-key", "theirs")  # data without a claim: not ours to flush
    with pytest.raises(pytest.skip.Exception, match="no Redis db number"):
        with private_redis():
            pass
    assert one_db.get("someone-elses-key") == b"theirs"
