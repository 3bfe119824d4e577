"""Many hosts, no shared disk: a job whose worker's host is lost finishes on another host from the store.

The stack is the production one (private PostgreSQL and Redis, a uvicorn API) with
`QLORA_STORAGE_URL=s3://...` on moto's S3 server process (tests/faults/services.py, S3Server). Each
worker is a `qlora worker` with a data directory of its own, standing for a host: nothing is shared
between API and workers but PostgreSQL, Redis and the bucket. The first host is SIGKILLed mid-job
after a checkpoint is recorded, and its directory deleted (the machine and its disk are gone); a
worker on a second host takes the job over, fetches the last checkpoint from the store, and ends
with an adapter bitwise equal to an uninterrupted run's, downloaded through the API.
"""

from __future__ import annotations

import io
import secrets
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.faultkit import CHECKPOINT_STEPS, MAX_STEPS, count, listed_checkpoints, production_stack, run_start_points
from tests.faults.stack import Stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_stack(tiny_model_dir: Path, s3_server: Any) -> Iterator[Stack]:
    bucket = s3_server.make_bucket(f"qlora-hosts-{secrets.token_hex(4)}")
    with production_stack(tiny_model_dir, persistent_redis=False, **s3_server.storage_env(bucket, "svc")) as stack:
        yield stack


def _host_dir(stack: Stack, name: str) -> Path:
    return stack.root / f"host-{name}"


def _start_on_host(stack: Stack, name: str) -> Any:
    return stack.start_worker(name, QLORA_DATA_DIR=str(_host_dir(stack, name)))


def _downloaded_adapter(stack: Stack, job_id: str) -> dict[str, Any]:
    """The job's adapter as a user gets it: the API's .tar.gz, unpacked, its tensors loaded."""
    from safetensors.torch import load

    resp = httpx.get(f"{stack.api.url}/v1/fine_tuning/jobs/{job_id}/adapter",
                     headers={"Authorization": f"Bearer {stack.key}"}, timeout=60)
    assert resp.status_code == 200, resp.text
    with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        member = tar.extractfile("adapter_model.safetensors")
        assert member is not None
        return load(member.read())


def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def test_a_job_whose_host_is_lost_finishes_on_another_host_from_the_store(s3_stack: Stack) -> None:
    import torch

    stack = s3_stack
    ref_worker = _start_on_host(stack, "ref")
    ref_id = stack.create_job(max_steps=MAX_STEPS, checkpoint_steps=CHECKPOINT_STEPS)
    ref_job = stack.wait_finished(ref_id)
    assert ref_job.status == "succeeded", f"{ref_job.error}\n{stack.logs()}"
    ref_worker.stop()
    reference = _downloaded_adapter(stack, ref_id)

    first = _start_on_host(stack, "a")
    job_id = stack.create_job(max_steps=MAX_STEPS, checkpoint_steps=CHECKPOINT_STEPS)
    stack.wait_until(f"checkpoint {CHECKPOINT_STEPS} of {job_id} recorded",
                     lambda: CHECKPOINT_STEPS in [c.step_number for c in listed_checkpoints(stack, job_id)])
    stack.wait_step(job_id, CHECKPOINT_STEPS + 2)
    first.kill()
    assert (_host_dir(stack, "a") / "cache" / "artifacts" / "jobs" / job_id).is_dir()  # it was training there
    shutil.rmtree(_host_dir(stack, "a"))  # the host is gone, and its disk with it

    second = _start_on_host(stack, "b")
    job = stack.wait_finished(job_id)
    assert job.status == "succeeded", f"{job.status} {job.error}\n{stack.logs()}"
    # The second host went on from a checkpoint the first one published, not from step 0.
    starts = run_start_points(stack, job_id)
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= CHECKPOINT_STEPS, stack.messages(job_id)
    assert stack.metrics_steps(job_id) == list(range(1, MAX_STEPS + 1))
    assert job.trained_tokens == ref_job.trained_tokens
    assert [c.step_number for c in listed_checkpoints(stack, job_id)] == \
        [c.step_number for c in listed_checkpoints(stack, ref_id)]
    got = _downloaded_adapter(stack, job_id)
    assert set(got) == set(reference)
    for name in reference:  # See Note: exact resume in qlora_core/train.py: bitwise on CPU
        torch.testing.assert_close(got[name], reference[name], rtol=0.0, atol=0.0, msg=name)
    # The results file and a checkpoint's adapter come from the store too.
    client = stack.client()
    csv = client.files.content(job.result_files[0]).text
    assert csv.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert len(csv.splitlines()) == MAX_STEPS + 1
    ckpt = listed_checkpoints(stack, job_id)[-1]
    resp = httpx.get(f"{stack.api.url}/v1/fine_tuning/jobs/{job_id}/checkpoints/{ckpt.id}/adapter",
                     headers={"Authorization": f"Bearer {stack.key}"}, timeout=60)
    assert resp.status_code == 200 and resp.content[:2] == b"\x1f\x8b"

    # A merged export is built by the worker on its host and served from the bucket.
    merged_url = f"{stack.api.url}/v1/fine_tuning/jobs/{job_id}/merged"
    headers = {"Authorization": f"Bearer {stack.key}"}
    stack.wait_until("the merged export", lambda: httpx.get(merged_url, headers=headers, timeout=60).status_code != 202,
                     poll_s=0.5)
    resp = httpx.get(merged_url, headers=headers, timeout=60)
    assert resp.status_code == 200, resp.text
    with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:gz") as tar:
        assert "config.json" in tar.getnames() and any(n.endswith(".safetensors") for n in tar.getnames())

    # Nothing was shared on disk: the API keeps no upload or artifact, and the host that finished
    # the job dropped its copy once everything was in the store; it keeps the model and dataset cached.
    assert _files_under(stack.root / "data" / "cache" / "files") == []
    assert _files_under(stack.root / "data" / "cache" / "artifacts") == []
    host_b = _host_dir(stack, "b") / "cache"
    assert not (host_b / "artifacts" / "jobs" / job_id / "checkpoints").exists()
    assert not (host_b / "artifacts" / "jobs" / job_id / "merged.tar.gz").exists()
    assert (host_b / "models" / "test--tiny-llama" / "config.json").is_file()
    assert [p for p in _files_under(host_b / "files") if p.endswith(".jsonl")]
    second.stop()
    count("hosts_lost_survived")
