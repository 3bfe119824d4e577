"""The task body (`run_job_here`) on a real SQLite database, a real model store and the real
training loop on a tiny random Llama: what a user sees in the job, its events and checkpoints.

Celery is not involved here (tests/e2e runs the real worker process); the task body is the same
function the Celery task calls.
"""

from __future__ import annotations

import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, update

from qlora_core.config import TrainConfig
from service.db import Checkpoint, File, Job, JobEvent, Model, Tenant, new_id
from service.settings import Settings, get_settings
from worker.lease import acquire, make_owner
from worker.tasks import run_job_here

TINY_ID = "test/tiny-llama"
NODE = "qlora@test-tasks"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> Iterator[tuple[Settings, Engine]]:
    """A private data dir: migrated SQLite, the tiny model imported into its store."""
    from qlora_core.store import ModelStore
    from service.database import get_engine
    from service.migrate import upgrade

    monkeypatch.setenv("QLORA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("QLORA_HEARTBEAT_S", "1")
    get_settings.cache_clear()
    settings = get_settings()
    settings.ensure_dirs()
    upgrade(settings.database_url)
    ModelStore(settings.models_dir).import_model(tiny_model_dir, TINY_ID)
    yield settings, get_engine(settings.database_url)
    get_settings.cache_clear()


def _chat(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}


def _create_job(settings: Settings, engine: Engine, n_examples: int, **config: Any) -> str:
    tenant, file_id, job_id = new_id("org"), new_id("file"), new_id("ftjob")
    rel = f"{tenant}/{file_id}.jsonl"
    path = Path(settings.files_dir) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(n_examples)))
    cfg = TrainConfig(lora_r=4, lora_alpha=8, batch_size=4, gradient_accumulation_steps=1, max_seq_length=64,
                      learning_rate=1e-3, compute_dtype="float32", optimizer="adamw_torch", **config)
    with engine.begin() as conn:
        conn.execute(insert(Tenant.__table__).values(id=tenant, name="acme"))
        conn.execute(insert(File.__table__).values(id=file_id, tenant_id=tenant, filename="train.jsonl",
                                                   purpose="fine-tune", bytes=path.stat().st_size, sha256="0" * 64,
                                                   storage_path=rel, n_examples=n_examples))
        conn.execute(insert(Job.__table__).values(id=job_id, tenant_id=tenant, model=TINY_ID, training_file=file_id,
                                                  status="validating_files", seed=0, suffix="math",
                                                  hyperparameters={}, config=cfg.to_dict()))
    return job_id


def _job(engine: Engine, job_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(Job.__table__).where(Job.__table__.c.id == job_id)).one()


def _events(engine: Engine, job_id: str) -> list[Any]:
    with engine.connect() as conn:
        t = JobEvent.__table__
        return list(conn.execute(select(t).where(t.c.job_id == job_id).order_by(t.c.seq)))


def test_job_runs_to_success_with_events_checkpoints_and_adapter(env: tuple[Settings, Engine], tmp_path: Path) -> None:
    settings, engine = env
    job_id = _create_job(settings, engine, 20, max_steps=4, n_checkpoints=2)
    assert run_job_here(engine, settings, job_id, NODE) == "succeeded"

    job = _job(engine, job_id)
    assert job.status == "succeeded" and job.error is None
    assert job.fine_tuned_model == f"ft:{TINY_ID}:acme:math:{job_id.split('-', 1)[1]}"
    assert job.trained_tokens > 0 and job.finished_at >= job.started_at
    assert job.lease_owner is None  # released
    assert job.progress["steps_completed"] == job.progress["total_steps"] == 4

    metrics = [e for e in _events(engine, job_id) if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [1, 2, 3, 4]
    assert all(e.data["total_steps"] == 4 and e.data["train_loss"] > 0 for e in metrics)
    messages = [e.message for e in _events(engine, job_id) if e.type == "message"]
    assert messages[-1] == "The job has successfully completed"

    with engine.connect() as conn:
        ckpts = list(conn.execute(select(Checkpoint.__table__).where(Checkpoint.__table__.c.job_id == job_id)))
        model = conn.execute(select(Model.__table__).where(Model.__table__.c.id == job.fine_tuned_model)).one()
    assert sorted(c.step_number for c in ckpts) == [2, 4]  # the last checkpoint is the final step
    assert all(c.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{c.step_number}" for c in ckpts)
    assert all((Path(settings.artifacts_dir) / c.adapter_path / "adapter_model.safetensors").is_file() for c in ckpts)
    assert model.kind == "fine_tuned" and model.tenant_id == job.tenant_id and model.base_model == TINY_ID

    archive = Path(settings.artifacts_dir) / "jobs" / job_id / "adapter.tar.gz"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path / "adapter", filter="data")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_core.store import ModelStore

    base = AutoModelForCausalLM.from_pretrained(ModelStore(settings.models_dir).model_path(TINY_ID))
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())


def test_too_few_examples_fails_with_openai_code(env: tuple[Settings, Engine]) -> None:
    settings, engine = env
    job_id = _create_job(settings, engine, 3, max_steps=2)
    assert run_job_here(engine, settings, job_id, NODE) == "failed"
    job = _job(engine, job_id)
    assert job.status == "failed" and job.error["code"] == "invalid_n_examples"
    assert job.error["param"] == "training_file"
    assert "3 example(s)" in job.error["message"] and "at least 10" in job.error["message"]
    assert _events(engine, job_id)[-1].level == "error"


def test_deleted_training_file_fails_the_job(env: tuple[Settings, Engine]) -> None:
    settings, engine = env
    job_id = _create_job(settings, engine, 12, max_steps=2)
    with engine.begin() as conn:
        conn.execute(update(File.__table__).values(deleted_at=int(time.time())))
    assert run_job_here(engine, settings, job_id, NODE) == "failed"
    assert _job(engine, job_id).error["code"] == "invalid_training_file"


def test_duplicate_delivery_does_nothing_while_another_worker_holds_the_job(env: tuple[Settings, Engine]) -> None:
    settings, engine = env
    job_id = _create_job(settings, engine, 12, max_steps=2)
    assert acquire(engine, job_id, make_owner("qlora@other-machine", pid=1), settings.lease_s)
    assert run_job_here(engine, settings, job_id, NODE) == "skipped"
    job = _job(engine, job_id)
    assert job.status == "validating_files" and job.lease_owner.startswith("qlora@other-machine|")
    assert _events(engine, job_id) == []


def test_cancel_requested_before_the_worker_starts(env: tuple[Settings, Engine]) -> None:
    settings, engine = env
    job_id = _create_job(settings, engine, 12, max_steps=2)
    with engine.begin() as conn:
        conn.execute(update(Job.__table__).where(Job.__table__.c.id == job_id).values(cancel_requested_at=int(time.time())))
    assert run_job_here(engine, settings, job_id, NODE) == "cancelled"
    job = _job(engine, job_id)
    assert job.status == "cancelled" and job.finished_at is not None and job.fine_tuned_model is None
