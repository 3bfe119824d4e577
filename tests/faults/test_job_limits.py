"""Jobs that hit a limit end `failed` with their own error code, and the worker carries on.

- Time limit: a real `qlora worker` with `QLORA_JOB_TIME_LIMIT_S=6` runs a job that would take far
  longer; it stops cooperatively and fails with `time_limit_exceeded`, its checkpoints kept, as
  its error message says: every checkpoint step it reached is complete on disk, listed by the API
  and downloadable, and nothing else is left (no temp dir, no final adapter). Nothing in the
  service deletes a job's checkpoints (the worker trains with `resume=True`, worker/training.py).
- Out of memory: a real allocation failure, not a fake. The task body (`worker.tasks.run_job_here`,
  what the Celery task calls) runs in a child process whose address space is capped with
  `RLIMIT_AS` a little above what it uses once everything is imported, on a job whose first
  step needs more than that (a batch of 8 long sequences). torch's CPU allocator fails as it
  would on a full machine, and the job fails with `out_of_memory` and a message saying what to
  lower. A CUDA out-of-memory cannot be provoked here (no GPU); the worker maps
  `torch.cuda.OutOfMemoryError` the same way (worker/training.py).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert, select

from qlora_core.checkpoint import ADAPTER, ADAPTER_WEIGHTS, checkpoint_name, list_checkpoints
from tests.faults.faultkit import CHECKPOINT_STEPS, count, listed_checkpoints
from tests.faults.stack import TINY_MODEL_ID, Stack

pytestmark = pytest.mark.slow

TIME_LIMIT_S = 6
# Address space allowed beyond what the child uses after its imports: enough for the model,
# data and threads (~60 MB), far less than the first step's activations (~300 MB at 8 x 900 tokens).
OOM_HEADROOM_BYTES = 200 * 2**20


def test_job_past_its_time_limit_fails_with_time_limit_exceeded(fault_stack: Stack) -> None:
    stack = fault_stack
    stack.start_worker("time-limited", QLORA_JOB_TIME_LIMIT_S=str(TIME_LIMIT_S))
    job_id = stack.create_job(max_steps=3000, checkpoint_steps=CHECKPOINT_STEPS)
    job = stack.wait_finished(job_id)
    assert job.status == "failed", f"{job.status}\n{stack.logs()}"
    assert job.error.code == "time_limit_exceeded"
    assert f"{TIME_LIMIT_S} s" in job.error.message and "QLORA_JOB_TIME_LIMIT_S" in job.error.message
    assert job.fine_tuned_model is None and job.finished_at is not None
    steps = stack.metrics_steps(job_id)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 3000
    row = stack.job_row(job_id)
    assert row.lease_owner is None and row.attempts == 1
    events = stack.events(job_id)
    assert events[-1].level == "error" and events[-1].message == job.error.message
    adapter = httpx.get(f"{stack.api.url}/v1/fine_tuning/jobs/{job_id}/adapter",
                        headers={"Authorization": f"Bearer {stack.key}"}, timeout=30)
    assert adapter.status_code == 400
    _assert_checkpoints_kept(stack, job_id, last_step=steps[-1])
    # The worker is free again: the next job runs on it.
    next_job = stack.wait_finished(stack.create_job(max_steps=2))
    assert next_job.status == "succeeded", next_job.error
    count("limit_failures_recorded")
    stack.stop_workers()


def _assert_checkpoints_kept(stack: Stack, job_id: str, last_step: int) -> None:
    """Every checkpoint step up to `last_step` is complete on disk, listed and downloadable; nothing else is there.

    A checkpoint is written right after its step's metrics event and the time limit is checked
    before the next step, so the last recorded step says exactly which checkpoints exist.
    """
    assert last_step >= CHECKPOINT_STEPS, f"stopped at step {last_step}, before the first checkpoint\n{stack.logs()}"
    kept = list(range(CHECKPOINT_STEPS, last_step + 1, CHECKPOINT_STEPS))
    job_dir = stack.job_dir(job_id)
    assert [step for step, _ in list_checkpoints(job_dir)] == kept
    assert sorted(os.listdir(job_dir / "checkpoints")) == [checkpoint_name(step) for step in kept]  # no temp dir
    assert not (job_dir / ADAPTER).exists()
    listed = listed_checkpoints(stack, job_id)
    assert [c.step_number for c in listed] == kept[::-1]
    for c in listed:
        resp = httpx.get(f"{stack.api.url}/v1/fine_tuning/jobs/{job_id}/checkpoints/{c.id}/adapter",
                         headers={"Authorization": f"Bearer {stack.key}"}, timeout=30)
        assert resp.status_code == 200, (c.step_number, resp.text)
        with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:gz") as tar:
            assert ADAPTER_WEIGHTS in tar.getnames(), (c.step_number, tar.getnames())


_CHILD = textwrap.dedent("""
    import resource, sys
    import bitsandbytes, peft, transformers  # everything the job imports, before the cap
    import qlora_core.train, qlora_core.models, qlora_core.data, worker.training, worker.runner, worker.validation
    from service.database import get_engine
    from service.settings import get_settings
    from worker.tasks import run_job_here

    settings = get_settings()
    engine = get_engine(settings.database_url)
    with engine.connect():
        pass
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            cap = int(line.split()[1]) * 1024 + int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    print(run_job_here(engine, settings, sys.argv[1], "qlora@oom-test"))
""")


def test_job_that_runs_out_of_memory_fails_with_out_of_memory(tmp_path: Path, tiny_model_dir: Path) -> None:
    from qlora_core.config import TrainConfig
    from qlora_core.store import ModelStore
    from service.database import make_engine
    from service.db import File, Job, Tenant, new_id
    from service.migrate import upgrade

    data = tmp_path / "data"
    url = f"sqlite:///{data / 'qlora.db'}"
    data.mkdir()
    upgrade(url)
    ModelStore(data / "models").import_model(tiny_model_dir, TINY_MODEL_ID)
    words = " ".join(f"w{i}" for i in range(250))  # ~900 tokens per example with the tiny tokenizer
    tenant, file_id, job_id = new_id("org"), new_id("file"), new_id("ftjob")
    path = data / "files" / tenant / f"{file_id}.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": words},
                                                     {"role": "assistant", "content": words}]}) + "\n"
                            for _ in range(16)))
    config = TrainConfig(lora_r=4, lora_alpha=8, batch_size=8, gradient_accumulation_steps=1, max_seq_length=2048,
                         max_steps=2, compute_dtype="float32", optimizer="adamw_torch", gradient_checkpointing=False)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(Tenant.__table__).values(id=tenant, name="acme"))
        conn.execute(insert(File.__table__).values(id=file_id, tenant_id=tenant, filename="train.jsonl",
                                                   purpose="fine-tune", bytes=path.stat().st_size, sha256="0" * 64,
                                                   storage_path=f"{tenant}/{file_id}.jsonl", n_examples=16))
        conn.execute(insert(Job.__table__).values(id=job_id, tenant_id=tenant, model=TINY_MODEL_ID,
                                                  training_file=file_id, status="queued", seed=0,
                                                  hyperparameters={}, config=config.to_dict()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env.update(QLORA_DATA_DIR=str(data), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-c", _CHILD, job_id, str(OOM_HEADROOM_BYTES)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "failed", proc.stderr[-3000:]
    with engine.connect() as conn:
        job = conn.execute(select(Job.__table__).where(Job.__table__.c.id == job_id)).one()
    engine.dispose()
    assert job.status == "failed" and job.error["code"] == "out_of_memory", (job.error, proc.stderr[-3000:])
    message = job.error["message"]
    assert "lower" in message and "batch_size (now 8" in message and "max_seq_length (now 2048)" in message
    assert job.fine_tuned_model is None and job.lease_owner is None
    count("limit_failures_recorded")
