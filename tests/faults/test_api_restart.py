"""The API process crashes (SIGKILL) mid-job: training goes on, and the restarted API serves it.

The API only validates, records and enqueues (CONTRACT "Layout"); a running job lives in the
worker and the database, so killing uvicorn must not touch it. A client following the job's
Server-Sent Events reconnects with `Last-Event-ID` (as browsers' EventSource do) and, across the
crash, sees every step exactly once and in order. After the restart the job's status, events,
checkpoints and adapter are served as if nothing happened.
"""

from __future__ import annotations

import io
import tarfile

import httpx
import pytest

from tests.faults.faultkit import (CHECKPOINT_STEPS, MAX_STEPS, SseReader, assert_nothing_lost_nothing_twice,
                                   count)
from tests.faults.stack import Stack

pytestmark = pytest.mark.slow


def test_api_killed_mid_job_then_restarted(fault_stack: Stack) -> None:
    stack = fault_stack
    stack.start_worker("under-api-crash")
    steps = 4 * MAX_STEPS  # long enough to outlive the API's crash and restart
    job_id = stack.create_job(max_steps=steps, checkpoint_steps=CHECKPOINT_STEPS)
    sse = SseReader(stack, job_id)
    sse.start()
    stack.wait_step(job_id, 2)
    pid = stack.api.proc.pid if stack.api.proc else None
    stack.api.kill()
    at_kill = max(stack.metrics_steps(job_id))
    stack.wait_step(job_id, at_kill + 2)  # the worker trains on without the API
    stack.api.start()
    count("restarts_survived")
    assert stack.api.proc is not None and stack.api.proc.pid != pid

    client = stack.client()
    job = client.fine_tuning.jobs.retrieve(job_id)
    assert job.status in ("running", "succeeded")
    job = assert_nothing_lost_nothing_twice(stack, job_id, steps, interruptions=0)
    events = client.fine_tuning.jobs.list_events(job_id, limit=1000).data  # newest first
    assert [e.data["step"] for e in reversed(events) if e.type == "metrics"] == list(range(1, steps + 1))
    assert events[0].message == "The job has successfully completed"
    ckpts = client.fine_tuning.jobs.checkpoints.list(job_id, limit=100).data
    assert [c.step_number for c in ckpts] == list(range(steps, 0, -CHECKPOINT_STEPS))
    resp = httpx.get(f"{stack.api.url}/v1/fine_tuning/jobs/{job_id}/adapter",
                     headers={"Authorization": f"Bearer {stack.key}"}, timeout=60)
    with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:gz") as tar:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(tar.getnames())

    sse.join(60)
    assert sse.reconnects >= 1  # the stream really was cut by the crash
    assert sse.metrics_steps() == list(range(1, steps + 1))
    assert [e["id"] for e in sse.events] == [e.id for e in reversed(events)]
    stack.stop_workers()
