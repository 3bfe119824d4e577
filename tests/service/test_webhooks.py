"""service/webhooks.py: the outbox and the dispatcher, against a real HTTP receiver that verifies every
event with the official SDK's `webhooks.unwrap`, on a migrated SQLite database (and PostgreSQL in
tests/e2e through the live service)."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import select, update

from service.database import get_engine, session_scope
from service.db import Job, WebhookDelivery, new_id, now
from service.keys import get_or_create_tenant
from service.migrate import upgrade
from service.webhooks import (EVENT_TYPES, Dispatcher, InvalidWebhookUrl, check_url, register_endpoint,
                              retry_delay_s, sign)
from tests.webhook_receiver import Receiver


@pytest.fixture()
def db(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    return url


def _tenant(url: str, name: str) -> str:
    with session_scope(url) as s:
        return get_or_create_tenant(s, name).id


def _endpoint(url: str, tenant_id: str, hook_url: str, events: list[str] | None = None) -> tuple[str, str]:
    with session_scope(url) as s:
        row = register_endpoint(s, tenant_id, hook_url, events, allow_insecure=True)
        return row.id, row.secret


def _job(url: str, tenant_id: str, status: str = "running") -> str:
    job_id = new_id("ftjob")
    with session_scope(url) as s:
        s.add(Job(id=job_id, tenant_id=tenant_id, model="m", training_file="file-x", status=status, seed=1,
                  hyperparameters={}, config={}, attempts=0))
    return job_id


def _finish(url: str, job_id: str, status: str) -> None:
    with session_scope(url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(status=status, finished_at=now()))


def _drain(d: Dispatcher, until, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, "the dispatcher did not get there"
        d.emit()
        d.deliver()
        time.sleep(0.05)


def test_each_final_status_reaches_its_tenants_endpoints_signed_as_openai_verifies(db) -> None:
    alice, bob = _tenant(db, "alice"), _tenant(db, "bob")
    a_recv = Receiver().start()
    b_recv = Receiver().start()
    _, a_recv.secret = _endpoint(db, alice, a_recv.url)
    _, b_recv.secret = _endpoint(db, bob, b_recv.url)
    only_success = Receiver().start()
    _, only_success.secret = _endpoint(db, alice, only_success.url, ["fine_tuning.job.succeeded"])
    jobs = {status: _job(db, alice) for status in ("succeeded", "failed", "cancelled")}
    running = _job(db, alice)
    d = Dispatcher(get_engine(db), allow_insecure=True)
    try:
        assert d.emit() == 0  # nothing finished yet
        for status, job_id in jobs.items():
            _finish(db, job_id, status)
        _drain(d, lambda: len(a_recv.received) == 3 and len(only_success.received) == 1)
        got = {r["event"].type: r["event"] for r in a_recv.received}
        assert set(got) == set(EVENT_TYPES)
        for status, job_id in jobs.items():
            event = got[f"fine_tuning.job.{status}"]
            assert event.data.id == job_id and event.object == "event" and event.id.startswith("evt_")
        assert only_success.received[0]["event"].type == "fine_tuning.job.succeeded"
        assert b_recv.received == [] and not a_recv.invalid  # never another tenant's events
        # each finished job is announced once, however often the dispatcher looks
        assert d.emit() == 0 and d.deliver() == 0 and len(a_recv.received) == 3
        assert running not in {r["event"].data.id for r in a_recv.received}
    finally:
        for r in (a_recv, b_recv, only_success):
            r.stop()


def test_a_receiver_that_is_down_gets_the_event_later_with_the_same_webhook_id(db) -> None:
    alice = _tenant(db, "alice")
    receiver = Receiver()
    _, receiver.secret = _endpoint(db, alice, receiver.url)  # registered, not listening yet
    job_id = _job(db, alice)
    _finish(db, job_id, "succeeded")
    engine = get_engine(db)
    d = Dispatcher(engine, allow_insecure=True)
    assert d.emit() == 1
    assert d.deliver() == 0  # connection refused
    with engine.connect() as c:
        row = c.execute(select(WebhookDelivery)).one()
    assert row.status == "pending" and row.attempts == 1 and "ConnectError" in row.last_error
    assert row.next_attempt_at > now()  # backed off
    receiver.start()
    receiver.answer = 503  # up, but failing
    with engine.begin() as c:
        c.execute(update(WebhookDelivery).values(next_attempt_at=now()))
    # a new dispatcher (the API restarted) carries on from the outbox
    d2 = Dispatcher(engine, allow_insecure=True)
    assert d2.deliver() == 0 and receiver.refused == 1
    receiver.answer = 200
    with engine.begin() as c:
        c.execute(update(WebhookDelivery).values(next_attempt_at=now()))
    assert d2.deliver() == 1
    try:
        [got] = receiver.received
        assert got["event"].data.id == job_id and got["headers"]["webhook-id"] == row.id
        with engine.connect() as c:
            done = c.execute(select(WebhookDelivery)).one()
        assert done.status == "delivered" and done.attempts == 3
    finally:
        receiver.stop()


def test_gives_up_after_max_age_and_drops_on_endpoint_delete(db) -> None:
    alice = _tenant(db, "alice")
    _endpoint(db, alice, "http://127.0.0.1:9/nowhere")
    engine = get_engine(db)
    _finish(db, _job(db, alice), "failed")
    d = Dispatcher(engine, allow_insecure=True, max_age_s=0)
    d.emit()
    d.deliver()
    with engine.connect() as c:
        assert c.execute(select(WebhookDelivery.status)).scalar_one() == "failed"


def test_signature_is_standard_webhooks() -> None:
    """The reference vector of the Standard Webhooks spec (its README's example)."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = '{"test": 2432232314}'
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_urls_are_https_and_public_unless_insecure_is_allowed() -> None:
    for bad in ("http://example.com/hook", "https://127.0.0.1/hook", "https://10.1.2.3/x", "https://[::1]/x",
                "https://169.254.169.254/latest", "ftp://example.com/x", "https://user:pw@example.com/x", "/relative"):
        with pytest.raises(InvalidWebhookUrl):
            check_url(bad, allow_insecure=False)
    assert check_url("https://93.184.215.14/hook", allow_insecure=False)
    assert check_url("http://127.0.0.1:8080/hook", allow_insecure=True)


def test_backoff_grows_to_an_hour() -> None:
    assert 4 <= retry_delay_s(1) <= 6 and 8 <= retry_delay_s(2) <= 12
    assert 2880 <= retry_delay_s(30) <= 4320


def test_payload_is_openais_event_shape(db) -> None:
    alice = _tenant(db, "alice")
    _endpoint(db, alice, "http://127.0.0.1:9/x")
    job_id = _job(db, alice)
    _finish(db, job_id, "cancelled")
    Dispatcher(get_engine(db), allow_insecure=True).emit()
    with get_engine(db).connect() as c:
        payload = json.loads(c.execute(select(WebhookDelivery.payload)).scalar_one())
    assert set(payload) == {"id", "object", "created_at", "type", "data"}
    assert payload["type"] == "fine_tuning.job.cancelled" and payload["data"] == {"id": job_id}


def test_an_endpoint_registered_after_a_job_ended_does_not_hear_of_it(db) -> None:
    """The outbox may look at a finished job only later; an endpoint made in between is not told of it."""
    alice = _tenant(db, "alice")
    ended = _job(db, alice)
    _finish(db, ended, "succeeded")
    with session_scope(db) as s:  # the job ended a minute before the endpoint existed
        s.execute(update(Job).where(Job.id == ended).values(finished_at=now() - 60))
    _endpoint(db, alice, "http://127.0.0.1:9/hook")
    later = _job(db, alice)
    _finish(db, later, "cancelled")
    Dispatcher(get_engine(db), allow_insecure=True).emit()
    with session_scope(db) as s:
        jobs = [r.job_id for r in s.scalars(select(WebhookDelivery))]
    assert jobs == [later]
