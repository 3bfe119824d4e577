"""Locust users for `bench_api_latency.py`: a job read and the liveness probe, in one run.

Each simulated user alternates, at random with equal weight, between
`GET /v1/fine_tuning/jobs/{id}` (authenticated, one SQL read of the job) and `GET /healthz` (no
auth, no database), so both see the same server, the same concurrency and the same moment; the
ratio of their tail latencies then says how much the job read itself costs under load, apart from
whatever the machine is doing. The idea is locust's own headless mode (`locust --headless -u N`),
see https://docs.locust.io/en/stable/running-without-web-ui.html.

The benchmark passes what it made through the environment:
- `BENCH_JOB_ID`, `BENCH_API_KEY`: the job to read and the key that owns it;
- `BENCH_SAMPLES_OUT`: a JSON file that receives every request's name, latency (ms) and outcome,
  so the percentiles are computed exactly (locust's own report rounds response times into
  buckets) and from the same samples for both endpoints;
- `BENCH_MAX_REQUESTS` (optional): stop once this many requests are done, so a fast server cannot
  make the run unbounded in count; `-t` bounds it in time.

Run by hand (with a service up):
    BENCH_JOB_ID=ftjob-... BENCH_API_KEY=sk-... BENCH_SAMPLES_OUT=/tmp/s.json \
        .venv/bin/locust -f bench/locustfile.py --headless -u 50 -r 50 -t 20s --host http://127.0.0.1:8000
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import gevent
from locust import FastHttpUser, between, events, task

JOB_NAME = "GET /v1/fine_tuning/jobs/{id}"
HEALTHZ_NAME = "GET /healthz"

_samples: list[tuple[str, float, bool]] = []  # (request name, response time ms, succeeded)
_window: dict[str, float] = {}  # wall-clock first/last completion, for requests per second
_stopping = False


@events.request.add_listener
def _record(request_type: str, name: str, response_time: float, response_length: int,
            exception: BaseException | None = None, **_: Any) -> None:
    """Keep every sample; ask the runner to stop once BENCH_MAX_REQUESTS are done."""
    global _stopping
    now = time.time()
    _window.setdefault("first", now)
    _window["last"] = now
    _samples.append((name, float(response_time), exception is None))
    limit = int(os.environ.get("BENCH_MAX_REQUESTS", "0") or 0)
    if limit and len(_samples) >= limit and not _stopping:
        _stopping = True
        runner = _record.environment.runner  # type: ignore[attr-defined]
        # Note: quit() from a separate greenlet, since it kills the users' greenlets, this one included.
        gevent.spawn(runner.quit)


@events.init.add_listener
def _remember_environment(environment: Any, **_: Any) -> None:
    _record.environment = environment  # type: ignore[attr-defined]


@events.quitting.add_listener
def _dump(environment: Any, **_: Any) -> None:
    """Write the samples where the benchmark reads them (nothing when run without it)."""
    out = os.environ.get("BENCH_SAMPLES_OUT")
    if not out:
        return
    with open(out, "w", encoding="utf-8") as fh:
        json.dump({"samples": _samples, "first": _window.get("first"), "last": _window.get("last")}, fh)


class JobReader(FastHttpUser):
    """A client polling its fine-tuning job, as a dashboard or the openai SDK's wait loop does."""

    # Note: a short think time keeps 50 users a concurrency of ~50 rather than a flood from one
    # 2-core load generator that would measure locust's own CPU starvation more than the server.
    wait_time = between(0.0, 0.1)

    def on_start(self) -> None:
        self.job_path = f"/v1/fine_tuning/jobs/{os.environ['BENCH_JOB_ID']}"
        self.auth = {"Authorization": f"Bearer {os.environ['BENCH_API_KEY']}"}

    @task
    def get_job(self) -> None:
        self.client.get(self.job_path, headers=self.auth, name=JOB_NAME)

    @task
    def healthz(self) -> None:
        self.client.get("/healthz", name=HEALTHZ_NAME)
