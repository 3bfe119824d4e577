"""Shared pieces of the destructive fault tests: module-scoped private servers, the reference run
of a job, and the checks that say "nothing was lost, nothing ran twice" after any fault.

Every check here reads what a user or an operator can read (the job through the SDK, its event
rows, its checkpoints on disk) and records what it saw in FIGURES (tests/faults/services.py):
`kills_survived`, `restarts_survived`, `jobs_lost`, `duplicate_runs`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.faults.services import FIGURES, ServerProcess, ServiceUnavailable, require, start_private_postgres, \
    start_private_redis
from tests.faults.stack import Stack, build_stack, load_adapter_tensors

for _k in ("kills_survived", "restarts_survived", "jobs_lost", "duplicate_runs"):
    FIGURES.setdefault(_k, 0)

# The job most fault tests run: checkpoints at 6, 12, 18, 24, so kills land between them.
MAX_STEPS = 24
CHECKPOINT_STEPS = 6

_RESUMED_FROM = re.compile(r"resumed from checkpoint at step (\d+)")


def count(figure: str, n: int = 1) -> None:
    FIGURES[figure] = FIGURES.get(figure, 0) + n


@contextmanager
def production_stack(tiny_model_dir: Path, persistent_redis: bool = True, **extra_env: str) -> Iterator[Stack]:
    """A private PostgreSQL + private Redis + API; fails under QLORA_REQUIRE_SERVICES=1 if a binary is missing."""
    servers: list[ServerProcess] = []
    stack: Stack | None = None
    try:
        try:
            pg_url, pg = start_private_postgres()
            servers.append(pg)
            _, redis = start_private_redis(persistent=persistent_redis)
            servers.append(redis)
        except ServiceUnavailable as e:
            require(e)
        stack = build_stack("production", tiny_model_dir, pg_url=pg_url, redis=redis, **extra_env)
        yield stack
    finally:
        from service.database import get_engine

        if stack is not None:
            stack.close()
        get_engine.cache_clear()  # engines of the private database must not outlive it
        for s in reversed(servers):
            s.close()


@contextmanager
def embedded_stack(tiny_model_dir: Path, **extra_env: str) -> Iterator[Stack]:
    stack = build_stack("embedded", tiny_model_dir, **extra_env)
    try:
        yield stack
    finally:
        stack.close()


class SseReader(threading.Thread):
    """Follows a job's `?stream=true` events like a client would, reconnecting with Last-Event-ID
    when the API goes away, and keeps every event it received (oldest first)."""

    def __init__(self, stack: Stack, job_id: str, timeout_s: float = 300.0) -> None:
        super().__init__(daemon=True)
        self.stack, self.job_id, self.timeout_s = stack, job_id, timeout_s
        self.events: list[dict[str, Any]] = []
        self.reconnects = 0

    def run(self) -> None:
        import json
        import time

        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            headers = {"Authorization": f"Bearer {self.stack.key}"}
            if self.events:
                headers["Last-Event-ID"] = self.events[-1]["id"]
            try:
                with httpx.stream("GET", f"{self.stack.api.url}/v1/fine_tuning/jobs/{self.job_id}/events",
                                  params={"stream": "true"}, headers=headers,
                                  timeout=httpx.Timeout(60, connect=5)) as resp:
                    if resp.status_code != 200:
                        raise httpx.TransportError(f"status {resp.status_code}")
                    for line in resp.iter_lines():
                        if line.startswith("data: "):
                            self.events.append(json.loads(line[len("data: "):]))
                    return  # the server ended the stream: the job is finished
            except (httpx.TransportError, httpx.HTTPStatusError):
                self.reconnects += 1
                time.sleep(0.5)

    def metrics_steps(self) -> list[int]:
        return [e["data"]["step"] for e in self.events if e["type"] == "metrics"]


def reference_run(stack: Stack, max_steps: int, dpo: bool = False, **qlora: Any) -> tuple[Any, dict[str, Any]]:
    """Run a job uninterrupted on a fresh worker; returns (job, adapter tensors). The worker is stopped after."""
    worker = stack.start_worker("ref")
    try:
        job_id = stack.create_job(max_steps=max_steps, dpo=dpo, **qlora)
        job = stack.wait_finished(job_id)
        assert job.status == "succeeded", f"{job.error}\n{stack.logs()}"
        return job, load_adapter_tensors(stack.job_dir(job_id) / "adapter")
    finally:
        worker.stop()


def run_start_points(stack: Stack, job_id: str) -> list[int]:
    """For every run of the job, in order, the step it trained from: the checkpoint step the
    engine says it resumed from, or 0 for a run that started at the beginning.

    A run begins at its "Fine-tuning job started"/"resumed" event; the engine's "resumed from
    checkpoint at step N" message, if any, follows it before the run's first step.
    """
    points: list[int] = []
    for msg in stack.messages(job_id):
        if msg in ("Fine-tuning job started", "Fine-tuning job resumed"):
            points.append(0)
        elif (m := _RESUMED_FROM.search(msg)) is not None:
            assert points and points[-1] == 0, f"a resume message outside a run's start: {stack.messages(job_id)}"
            points[-1] = int(m.group(1))
    return points


def listed_checkpoints(stack: Stack, job_id: str) -> list[Any]:
    """The job's checkpoints as a client lists them through the SDK (every page), newest first."""
    return list(stack.client().fine_tuning.jobs.checkpoints.list(job_id, limit=100))


def assert_nothing_lost_nothing_twice(stack: Stack, job_id: str, max_steps: int, interruptions: int,
                                      reference: tuple[Any, dict[str, Any]] | None = None) -> Any:
    """The checks every fault ends with: succeeded, every step's metrics exactly once, one
    (re)start per interruption and no more, the same adapter and tokens as an uninterrupted run."""
    import torch

    job = stack.wait_finished(job_id)
    if job.status != "succeeded":
        count("jobs_lost")
    assert job.status == "succeeded", f"{job.status} {job.error}\n{stack.logs()}"
    steps = stack.metrics_steps(job_id)
    # Exactly one metrics event per step, none missing: a replayed step is dropped by its dedup_key.
    assert steps == list(range(1, max_steps + 1)), steps
    messages = stack.messages(job_id)
    runs = messages.count("Fine-tuning job started") + messages.count("Fine-tuning job resumed")
    count("duplicate_runs", max(0, runs - (interruptions + 1)))
    assert messages.count("Fine-tuning job started") == 1, messages
    assert runs == interruptions + 1, f"{runs} runs for {interruptions} interruption(s): {messages}"
    row = stack.job_row(job_id)
    assert row.attempts == interruptions + 1 and row.lease_owner is None
    # No half-written checkpoint left behind, and every listed one is complete.
    ckpt_dir = stack.job_dir(job_id) / "checkpoints"
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".tmp-")]
    assert all((p / "COMPLETE").is_file() for p in ckpt_dir.iterdir())
    resp = httpx.get(f"{stack.api.url}/v1/fine_tuning/jobs/{job_id}/adapter",
                     headers={"Authorization": f"Bearer {stack.key}"}, timeout=60)
    assert resp.status_code == 200 and len(resp.content) > 0
    if reference is not None:
        ref_job, ref_tensors = reference
        assert job.trained_tokens == ref_job.trained_tokens
        got = load_adapter_tensors(stack.job_dir(job_id) / "adapter")
        assert set(got) == set(ref_tensors)
        # See Note: exact resume in qlora_core/train.py: on CPU a resumed run is bitwise equal to
        # an uninterrupted one, so the tolerance is zero.
        for name in ref_tensors:
            torch.testing.assert_close(got[name], ref_tensors[name], rtol=0.0, atol=0.0, msg=name)
        ref_ckpts = [c.step_number for c in listed_checkpoints(stack, ref_job.id)]
        ckpts = [c.step_number for c in listed_checkpoints(stack, job_id)]
        assert ckpts == ref_ckpts, f"checkpoints {ckpts} against the uninterrupted run's {ref_ckpts}: {stack.messages(job_id)}"
    return job
