"""End to end, over HTTP with the official `openai` SDK, against a live API and a real Celery
worker process, in the embedded and the production mode: a whole job from upload to an adapter
that `PeftModel.from_pretrained` loads, events over Server-Sent Events, and cancelling a running job.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.db import FINISHED_STATUSES
from qlora_cli.probe import wait_for_job_status
from tests.e2e.conftest import TINY_MODEL_ID, LiveService

pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 300


def _training_file(n: int) -> bytes:
    lines = []
    for i in range(n):
        lines.append(json.dumps({"messages": [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": f"What is {i} plus {i + 1}?"},
            {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1}."},
        ]}))
    return ("\n".join(lines) + "\n").encode()


def _create_job(live: LiveService, n_examples: int, max_steps: int, n_checkpoints: int | None = None) -> tuple[Any, float]:
    client = live.client()
    upload = client.files.create(file=("train.jsonl", io.BytesIO(_training_file(n_examples))), purpose="fine-tune")
    qlora: dict[str, Any] = {"lora_r": 4, "lora_alpha": 8, "max_seq_length": 64, "max_steps": max_steps,
                             "gradient_accumulation_steps": 1, "learning_rate": 1e-3}
    if n_checkpoints:
        qlora["n_checkpoints"] = n_checkpoints
    t0 = time.monotonic()
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL_ID, training_file=upload.id, suffix="e2e", seed=7,
        hyperparameters={"n_epochs": 1, "batch_size": 2}, extra_body={"qlora": qlora},
    )
    return job, t0


def _sse_events(live: LiveService, job_id: str, until_metrics: bool = False) -> list[dict[str, Any]]:
    """Read the job's event stream (oldest first) until it ends, or until the first metrics event."""
    events: list[dict[str, Any]] = []
    url = f"{live.base_url}/v1/fine_tuning/jobs/{job_id}/events"
    with httpx.stream("GET", url, params={"stream": "true"}, headers=live.headers,
                      timeout=httpx.Timeout(JOB_TIMEOUT_S, connect=10)) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
                if until_metrics and events[-1]["type"] == "metrics":
                    break
    return events


def _wait_finished(live: LiveService, job_id: str) -> Any:
    return wait_for_job_status(live.client(), job_id, FINISHED_STATUSES, JOB_TIMEOUT_S, log_tail=live.log_tail)


def test_whole_job_from_upload_to_peft_adapter(live: LiveService, tmp_path: Path) -> None:
    job, t0 = _create_job(live, n_examples=20, max_steps=4, n_checkpoints=2)
    assert job.status == "validating_files"

    events = _sse_events(live, job.id)
    metrics = [e for e in events if e["type"] == "metrics"]
    print(f"\n[{live.mode}] job creation -> first metrics event (SSE): "
          f"{_first_metrics_delay(live, job.id, t0, events):.1f} s")
    job = _wait_finished(live, job.id)
    assert job.status == "succeeded", f"{job.error}\n{live.log_tail()}"
    # Exactly one metrics event per logged step, in order, with OpenAI's fields.
    assert [e["data"]["step"] for e in metrics] == [1, 2, 3, 4]
    assert all({"train_loss", "train_mean_token_accuracy"} <= set(e["data"]) for e in metrics)
    assert [e["message"] for e in events if e["type"] == "message"][-1] == "The job has successfully completed"
    # The worker resolved the compute dtype on its device and said so (CONTRACT: a message containing compute_dtype).
    dtype_notes = [e["message"] for e in events if e["type"] == "message" and "compute_dtype" in e["message"]]
    assert len(dtype_notes) == 1 and dtype_notes[0].startswith("compute_dtype "), dtype_notes

    assert job.fine_tuned_model.startswith(f"ft:{TINY_MODEL_ID}:e2e:e2e:")
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at
    client = live.client()
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts] == [4, 2]  # newest first; the last is the final step
    assert ckpts[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-4"
    assert job.fine_tuned_model in {m.id for m in client.models.list().data}
    # OpenAI's results file: plain CSV here, one row per metrics event
    (results,) = job.result_files
    rows = client.files.content(results).text.splitlines()
    assert rows[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4]

    resp = httpx.get(f"{live.base_url}/v1/fine_tuning/jobs/{job.id}/adapter", headers=live.headers, timeout=60)
    assert resp.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:gz") as tar:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(tar.getnames())
        tar.extractall(tmp_path / "adapter", filter="data")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_core.store import ModelStore

    base = AutoModelForCausalLM.from_pretrained(ModelStore(live.data_dir / "models").model_path(TINY_MODEL_ID))
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    # LoRA's B starts at zero: a trained adapter has moved it.
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)
    assert not any(torch.isnan(p).any() for p in lora_b)


def test_cancel_a_running_job(live: LiveService) -> None:
    job, _ = _create_job(live, n_examples=40, max_steps=400)
    first = _sse_events(live, job.id, until_metrics=True)
    assert first and first[-1]["type"] == "metrics", live.log_tail()
    # `curl /metrics` (from loopback, no token set) shows it running, with its worker
    text = httpx.get(f"{live.base_url}/metrics", timeout=30).text
    assert 'qlora_jobs{status="running"} 1.0' in text, text
    assert f'job="{job.id}"' in text and "qlora_worker_up{" in text
    client = live.client()
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status in ("running", "cancelled")
    job = _wait_finished(live, job.id)
    assert job.status == "cancelled", f"{job.status} {job.error}\n{live.log_tail()}"
    assert job.fine_tuned_model is None and job.finished_at is not None
    # Nothing partial is published as final.
    resp = httpx.get(f"{live.base_url}/v1/fine_tuning/jobs/{job.id}/adapter", headers=live.headers, timeout=30)
    assert resp.status_code == 400
    assert not (live.data_dir / "artifacts" / "jobs" / job.id / "adapter").exists()
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert messages[0] == "Fine-tuning job cancelled"  # newest first
    steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data if e.type == "metrics"]
    assert 0 < len(steps) < 400


def _first_metrics_delay(live: LiveService, job_id: str, t0: float, events: list[dict[str, Any]]) -> float:
    """Seconds from job creation to the first metrics event, from the events' own timestamps."""
    created = live.client().fine_tuning.jobs.retrieve(job_id).created_at
    first = next(e["created_at"] for e in events if e["type"] == "metrics")
    return float(first - created)


def test_webhooks_announce_each_end_verified_by_the_sdk(live: LiveService) -> None:
    """A receiver written with the `openai` SDK (`webhooks.unwrap`) gets a signed event for a job that
    succeeds and for one that is cancelled; an endpoint made with `qlora webhooks create` for another
    tenant gets nothing."""
    from tests.e2e.conftest import _run, qlora_cmd
    from tests.webhook_receiver import Receiver

    import dataclasses

    # A tenant of its own: jobs of the other tests in this module end while this one runs.
    key = _run(qlora_cmd("keys", "create", "--tenant", "webhook-receiver"), live.env).strip().splitlines()[-1]
    live = dataclasses.replace(live, api_key=key)
    mine = Receiver().start()
    theirs = Receiver().start()
    try:
        r = httpx.post(f"{live.base_url}/v1/webhooks", headers=live.headers, json={"url": mine.url}, timeout=30)
        assert r.status_code == 200, r.text
        mine.secret = r.json()["secret"]
        out = _run(qlora_cmd("webhooks", "create", "--tenant", "someone-else", "--url", theirs.url), live.env)
        theirs.secret = out.strip().splitlines()[-1]
        assert theirs.secret.startswith("whsec_")
        assert theirs.url in _run(qlora_cmd("webhooks", "list", "--tenant", "someone-else"), live.env)

        done, _ = _create_job(live, n_examples=12, max_steps=2)
        queued, _ = _create_job(live, n_examples=12, max_steps=400)
        live.client().fine_tuning.jobs.cancel(queued.id)
        assert _wait_finished(live, done.id).status == "succeeded"
        assert _wait_finished(live, queued.id).status == "cancelled"
        deadline = time.monotonic() + 60
        while len(mine.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        got = {r["event"].data.id: r["event"].type for r in mine.received}
        assert got == {done.id: "fine_tuning.job.succeeded", queued.id: "fine_tuning.job.cancelled"}, \
            (mine.received, mine.invalid, live.log_tail())
        assert not mine.invalid and theirs.received == []
    finally:
        mine.stop()
        theirs.stop()
