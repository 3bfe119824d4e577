"""Webhooks: tell a tenant's endpoints that a job succeeded, failed or was cancelled, as OpenAI does.

Events are shaped as OpenAI's (`{"id": "evt_...", "object": "event", "created_at", "type",
"data": {"id": job_id}}`) and signed per the Standard Webhooks spec (REFERENCES.md "Webhooks"), so a
receiver verifies them with the official SDK: `OpenAI(webhook_secret=...).webhooks.unwrap(body,
headers)`.

# Note: webhook outbox
# Nothing that finishes a job (a worker's transition, an API cancel, the reconciler giving up) has
# to remember webhooks. The job row is the outbox's source: `Dispatcher.emit` finds finished jobs
# whose `webhooks_emitted_at` is NULL and, in one transaction, claims each (an UPDATE that only one
# process wins) and inserts one `webhook_deliveries` row per subscribed endpoint. `Dispatcher.deliver`
# then claims due rows (another winner-takes-it UPDATE setting `locked_until`), POSTs them, and
# records the outcome: delivered on a 2xx, else retried with exponential backoff (5 s doubling to at
# most an hour) until `max_age_s` (72 h, as OpenAI) after the event. Every step is a database write,
# so a dispatcher killed at any point leaves the row to the next one: delivery is at-least-once
# (the `webhook-id` header stays the same on every try, for receivers to drop duplicates), and it
# survives restarts of the API and the workers. Any number of API processes may run a dispatcher.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import secrets
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine, func, insert, or_, select, update
from sqlalchemy.orm import Session

from service.db import Job, WebhookDelivery, WebhookEndpoint, new_id, now

log = logging.getLogger(__name__)

EVENT_TYPES = ("fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled")
_TYPE_OF_STATUS = {"succeeded": EVENT_TYPES[0], "failed": EVENT_TYPES[1], "cancelled": EVENT_TYPES[2]}
SECRET_PREFIX = "whsec_"
FIRST_RETRY_S = 5
MAX_RETRY_S = 3600
LOCK_S = 120  # a claimed delivery is another dispatcher's again after this long (its claimer died)


class InvalidWebhookUrl(ValueError):
    """A URL that this service will not send events to; the message says why."""


class WebhookRefused(ValueError):
    """An endpoint that cannot be registered for a reason other than its URL; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header: `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _private(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not ip.is_global or ip.is_multicast


def check_url(url: str, allow_insecure: bool) -> str:
    """Accept `url` as an endpoint, or raise InvalidWebhookUrl saying why.

    Without `allow_insecure` (QLORA_WEBHOOK_ALLOW_INSECURE), only `https://` URLs whose host resolves
    to public addresses: no loopback, private, link-local or reserved ones, so that a tenant cannot
    make the service call into its own network. With it, `http://` and any address (development).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidWebhookUrl(f"url must be an absolute https:// URL, got {url[:200]!r}")
    if parts.username or parts.password:
        raise InvalidWebhookUrl("url must not carry credentials")
    if allow_insecure:
        return url
    if parts.scheme != "https":
        raise InvalidWebhookUrl("url must use https:// (QLORA_WEBHOOK_ALLOW_INSECURE=true allows http:// "
                                "and loopback in development)")
    resolve_public(parts.hostname, parts.port or 443)
    return url


def resolve_public(host: str, port: int) -> None:
    """Raise InvalidWebhookUrl unless every address `host` resolves to is public."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise InvalidWebhookUrl(f"cannot resolve the host {host!r}: {e.strerror}") from e
    bad = sorted({str(info[4][0]) for info in infos if _private(str(info[4][0]))})
    if bad:
        raise InvalidWebhookUrl(f"the host {host!r} resolves to a non-public address ({', '.join(bad)})")


MAX_ENDPOINTS = 20  # per tenant


def register_endpoint(session: Session, tenant_id: str, url: str, events: list[str] | None,
                      allow_insecure: bool) -> WebhookEndpoint:
    """Add an endpoint for the tenant inside `session` (the caller commits); the API and the CLI share it.

    Raises:
        InvalidWebhookUrl: the URL is refused (see `check_url`).
        WebhookRefused: unknown event types, or the tenant has MAX_ENDPOINTS endpoints already.
    """
    chosen = list(dict.fromkeys(events)) if events is not None else list(EVENT_TYPES)
    unknown = [e for e in chosen if e not in EVENT_TYPES]
    if unknown or not chosen:
        raise WebhookRefused(f"events must be some of {', '.join(EVENT_TYPES)}; got {unknown or chosen!r}", "events")
    url = check_url(url, allow_insecure)
    count = session.scalar(select(func.count()).select_from(WebhookEndpoint).where(
        WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.deleted_at.is_(None))) or 0
    if count >= MAX_ENDPOINTS:
        raise WebhookRefused(f"the tenant already has {count} webhook endpoints, the limit is {MAX_ENDPOINTS}; "
                             "delete one first", "url")
    row = WebhookEndpoint(id=new_id("we"), tenant_id=tenant_id, url=url, events=chosen, secret=new_secret(),
                          created_at=now())
    session.add(row)
    session.flush()
    return row


def retry_delay_s(attempts: int) -> int:
    """Seconds before try `attempts + 1`: 5, 10, 20, ... capped at an hour, with ±20 % jitter."""
    base = min(FIRST_RETRY_S * 2 ** max(attempts - 1, 0), MAX_RETRY_S)
    return max(1, int(base * random.uniform(0.8, 1.2)))


class Dispatcher(threading.Thread):
    """Turns finished jobs into deliveries and delivers them (See Note: webhook outbox).

    Args:
        engine: the service database.
        allow_insecure: QLORA_WEBHOOK_ALLOW_INSECURE (http:// and private addresses allowed).
        poll_s: how often to look for work.
        max_age_s: give up on an event this long after it happened.
        timeout_s: one POST's time limit.
    """

    def __init__(self, engine: Engine, allow_insecure: bool, poll_s: float = 2.0, max_age_s: int = 72 * 3600,
                 timeout_s: float = 10.0) -> None:
        super().__init__(name="webhook-dispatcher", daemon=True)
        self.engine, self.allow_insecure = engine, allow_insecure
        self.poll_s, self.max_age_s = poll_s, max_age_s
        self._stop_event = threading.Event()
        self._http = httpx.Client(timeout=timeout_s, follow_redirects=False,
                                  headers={"User-Agent": "qlora-service-webhooks/1"})

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.emit()
                self.deliver()
            except Exception:  # a database outage or a bug: log it, keep the thread, try again
                log.exception("webhook dispatch failed; retrying in %.0f s", self.poll_s)
            self._stop_event.wait(self.poll_s)
        self._http.close()

    def stop(self) -> None:
        self._stop_event.set()

    # --- the outbox -----------------------------------------------------------------------------
    def emit(self, limit: int = 100) -> int:
        """Queue one delivery per subscribed endpoint for each newly finished job; returns how many."""
        with self.engine.connect() as conn:
            jobs = conn.execute(
                select(Job.id, Job.tenant_id, Job.status, Job.finished_at)
                .where(Job.webhooks_emitted_at.is_(None), Job.status.in_(tuple(_TYPE_OF_STATUS)))
                .order_by(Job.seq).limit(limit)).all()
        queued = 0
        for job in jobs:
            t = now()
            event_type = _TYPE_OF_STATUS[job.status]
            with self.engine.begin() as conn:
                won = conn.execute(update(Job).where(Job.id == job.id, Job.webhooks_emitted_at.is_(None))
                                   .values(webhooks_emitted_at=t)).rowcount == 1
                if not won:
                    continue  # another dispatcher announced it
                # Only endpoints that existed when the job ended: one registered after it (while this
                # dispatcher had not yet looked) must not hear of a job that ended before it existed.
                endpoints = conn.execute(select(WebhookEndpoint.id, WebhookEndpoint.events).where(
                    WebhookEndpoint.tenant_id == job.tenant_id, WebhookEndpoint.deleted_at.is_(None),
                    WebhookEndpoint.created_at <= (job.finished_at or t))).all()
                rows = []
                event_id = "evt_" + secrets.token_hex(12)
                body = json.dumps({"id": event_id, "object": "event", "created_at": job.finished_at or t,
                                   "type": event_type, "data": {"id": job.id}}, separators=(",", ":"))
                for ep in endpoints:
                    if event_type in (ep.events or EVENT_TYPES):
                        rows.append({"id": new_id("msg"), "endpoint_id": ep.id, "tenant_id": job.tenant_id,
                                     "event_id": event_id, "type": event_type, "job_id": job.id, "payload": body,
                                     "status": "pending", "attempts": 0, "next_attempt_at": t, "created_at": t})
                if rows:
                    conn.execute(insert(WebhookDelivery), rows)
                    queued += len(rows)
        return queued

    def deliver(self, limit: int = 20) -> int:
        """Send the due deliveries once each; returns how many were delivered."""
        t = now()
        with self.engine.connect() as conn:
            due = conn.execute(
                select(WebhookDelivery.id).where(
                    WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= t,
                    or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < t))
                .order_by(WebhookDelivery.next_attempt_at).limit(limit)).scalars().all()
        return sum(self._deliver_one(delivery_id) for delivery_id in due)

    def _deliver_one(self, delivery_id: str) -> bool:
        t = now()
        with self.engine.begin() as conn:
            claimed = conn.execute(
                update(WebhookDelivery).where(
                    WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
                    or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < t))
                .values(locked_until=t + LOCK_S, attempts=WebhookDelivery.attempts + 1)).rowcount == 1
            if not claimed:
                return False
            delivery = conn.execute(
                select(WebhookDelivery.id, WebhookDelivery.payload, WebhookDelivery.type, WebhookDelivery.job_id,
                       WebhookDelivery.attempts, WebhookDelivery.created_at, WebhookEndpoint.url,
                       WebhookEndpoint.secret, WebhookEndpoint.deleted_at)
                .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                .where(WebhookDelivery.id == delivery_id)).one()
        if delivery.deleted_at is not None:
            self._finish(delivery_id, status="dropped", error="the endpoint was deleted")
            return False
        error = self._post(delivery.url, delivery.secret, delivery)
        if error is None:
            self._finish(delivery_id, status="delivered", delivered_at=now())
            log.info("webhook %s (%s of %s) delivered to %s", delivery_id, delivery.type, delivery.job_id, delivery.url)
            return True
        if now() - delivery.created_at >= self.max_age_s:
            self._finish(delivery_id, status="failed", error=error)
            log.warning("webhook %s to %s given up after %d tries: %s", delivery_id, delivery.url, delivery.attempts, error)
        else:
            self._finish(delivery_id, status="pending", error=error,
                         next_attempt_at=now() + retry_delay_s(delivery.attempts))
            log.info("webhook %s to %s failed (try %d): %s", delivery_id, delivery.url, delivery.attempts, error)
        return False

    def _post(self, url: str, secret: str, delivery: Any) -> str | None:
        """POST one delivery; None on a 2xx, else what went wrong."""
        parts = urlsplit(url)
        try:
            if not self.allow_insecure:  # the name may point somewhere else since it was registered
                resolve_public(parts.hostname or "", parts.port or 443)
            timestamp = int(time.time())
            headers = {"Content-Type": "application/json", "webhook-id": delivery.id,
                       "webhook-timestamp": str(timestamp),
                       "webhook-signature": sign(secret, delivery.id, timestamp, delivery.payload)}
            resp = self._http.post(url, content=delivery.payload.encode(), headers=headers)
        except (httpx.HTTPError, InvalidWebhookUrl) as e:
            return f"{type(e).__name__}: {e}"[:500]
        if 200 <= resp.status_code < 300:
            return None
        return f"HTTP {resp.status_code}"

    def _finish(self, delivery_id: str, status: str, error: str | None = None, **values: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                         .values(status=status, last_error=error, locked_until=None, **values))
