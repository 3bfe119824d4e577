"""`GET /metrics`: the service in Prometheus' text format (prometheus-client).

Two kinds of figure. The database's, read at each scrape by a collector (so every API replica
answers the same, and nothing is lost when one restarts): jobs by status, the queue depth, finished
jobs' durations as a histogram, training throughput of running jobs, tokens trained in all, live
workers with their device and compute dtype, and webhook deliveries by status. And this process's
own: HTTP latency by route template (time to the response's first byte, so a long event stream
counts as its start), from a small ASGI middleware.

Access (CONTRACT.md, `QLORA_METRICS_TOKEN`): with a token set, only `Authorization: Bearer <token>`;
without one, only clients on a loopback address.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select

from api.errors import APIError
from api.fitcheck import live_workers
from service.database import session_scope
from service.db import Job, WebhookDelivery
from service.settings import Settings

JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
DURATION_BUCKETS_S = (60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 24 * 3600)

router = APIRouter(tags=["operations"])


class DatabaseCollector(Collector):
    """The service-wide figures, read from the database when Prometheus scrapes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Any]:
        t = int(time.time())
        with session_scope(self.settings.database_url) as s:
            by_status = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            jobs = GaugeMetricFamily("qlora_jobs", "Fine-tuning jobs by status", labels=["status"])
            for status in JOB_STATUSES:
                jobs.add_metric([status], by_status.get(status, 0))
            yield jobs
            yield GaugeMetricFamily("qlora_queue_depth", "Jobs waiting for a worker (validating_files or queued)",
                                    value=by_status.get("validating_files", 0) + by_status.get("queued", 0))

            duration = Job.finished_at - Job.started_at
            finished = (Job.status.in_(("succeeded", "failed", "cancelled")), Job.started_at.is_not(None),
                        Job.finished_at.is_not(None))
            row = s.execute(select(func.count(), func.coalesce(func.sum(duration), 0),
                                   *[func.sum(case((duration <= b, 1), else_=0)) for b in DURATION_BUCKETS_S])
                            .where(*finished)).one()
            count, total = int(row[0]), float(row[1])
            buckets = [(str(float(b)), int(n or 0)) for b, n in zip(DURATION_BUCKETS_S, row[2:])] + [("+Inf", count)]
            yield HistogramMetricFamily("qlora_job_duration_seconds", "Run time of finished jobs (start to end)",
                                        buckets=buckets, sum_value=total)

            running = s.execute(select(Job.id, Job.model, Job.trained_tokens, Job.started_at)
                                .where(Job.status == "running", Job.started_at.is_not(None))).all()
            rate = GaugeMetricFamily("qlora_job_training_tokens_per_second",
                                     "Tokens trained per second by each running job, since it started",
                                     labels=["job", "model"])
            for job in running:
                rate.add_metric([job.id, job.model], (job.trained_tokens or 0) / max(t - job.started_at, 1))
            yield rate
            yield GaugeMetricFamily("qlora_trained_tokens", "Tokens trained by all jobs (rate() gives throughput)",
                                    value=s.scalar(select(func.coalesce(func.sum(Job.trained_tokens), 0))) or 0)

            workers = GaugeMetricFamily("qlora_worker_up", "Live workers, labelled with their device",
                                        labels=["worker", "device", "compute_dtype", "job"])
            memory = GaugeMetricFamily("qlora_worker_device_memory_bytes", "Device memory of each live worker",
                                       labels=["worker"])
            for w in live_workers(s, self.settings, at=t):
                workers.add_metric([w.id, w.device, w.compute_dtype or "", w.current_job or ""], 1)
                memory.add_metric([w.id], w.device_memory_bytes)
            yield workers
            yield memory

            hooks = GaugeMetricFamily("qlora_webhook_deliveries", "Webhook deliveries by status", labels=["status"])
            for status, n in s.execute(select(WebhookDelivery.status, func.count())
                                       .group_by(WebhookDelivery.status)).all():
                hooks.add_metric([status], n)
            yield hooks


class LatencyMiddleware:
    """Observe each HTTP request's time to its first byte, by method, route template and status."""

    def __init__(self, app: Any, histogram: Histogram) -> None:
        self.app, self.histogram = app, histogram

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        first: dict[str, Any] = {}

        async def timed_send(message: dict) -> None:
            if message["type"] == "http.response.start" and not first:
                first.update(status=message["status"], elapsed=time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            if first:
                self.histogram.labels(scope["method"], route, str(first["status"])).observe(first["elapsed"])


def make_registry(settings: Settings) -> tuple[CollectorRegistry, Histogram]:
    """A registry per app (tests build many apps in one process), with the database collector."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(settings))
    latency = Histogram("qlora_http_request_duration_seconds", "Time to the first byte of each API response",
                        ["method", "route", "status"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    return registry, latency


def _allowed(request: Request, settings: Settings) -> None:
    if settings.metrics_token:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.metrics_token}".encode()):
            raise APIError(401, "GET /metrics needs Authorization: Bearer <QLORA_METRICS_TOKEN>.",
                           code="invalid_metrics_token", headers={"WWW-Authenticate": "Bearer"})
        return
    host = request.client.host if request.client else ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host in ("testclient", "localhost")
    if not loopback:
        raise APIError(403, "GET /metrics answers only loopback clients unless QLORA_METRICS_TOKEN is set.",
                       code="metrics_forbidden")


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    """Prometheus text format; see the module docstring for what is in it and who may read it."""
    settings: Settings = request.app.state.settings
    _allowed(request, settings)
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
