"""The task body (`run_job_here`) on a real SQLite database, a real model store and the real
training loop on a tiny random Llama: what a user sees in the job, its events and checkpoints.

Celery is not involved here (tests/e2e runs the real worker process); the task body is the same
function the Celery task calls.
"""

from __future__ import annotations

import csv
import hashlib
import io
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


def _create_job(settings: Settings, engine: Engine, n_examples: int, n_valid: int = 0, **config: Any) -> str:
    """A tenant, its training file (and, with `n_valid`, a validation file of other sums) and a job."""
    tenant, job_id = new_id("org"), new_id("ftjob")
    cfg = TrainConfig(lora_r=4, lora_alpha=8, batch_size=4, gradient_accumulation_steps=1, max_seq_length=64,
                      learning_rate=1e-3, compute_dtype="float32", optimizer="adamw_torch", **config)
    with engine.begin() as conn:
        conn.execute(insert(Tenant.__table__).values(id=tenant, name="acme"))
        file_id = _add_file(settings, conn, tenant, "train.jsonl", range(n_examples))
        valid_id = _add_file(settings, conn, tenant, "valid.jsonl", range(100, 100 + n_valid)) if n_valid else None
        conn.execute(insert(Job.__table__).values(id=job_id, tenant_id=tenant, model=TINY_ID, training_file=file_id,
                                                  validation_file=valid_id, status="validating_files", seed=0,
                                                  suffix="math", hyperparameters={}, config=cfg.to_dict()))
    return job_id


def _add_file(settings: Settings, conn: Any, tenant: str, name: str, numbers: range) -> str:
    file_id = new_id("file")
    rel = f"{tenant}/{file_id}.jsonl"
    path = Path(settings.files_dir) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(_chat(i)) + "\n" for i in numbers))
    conn.execute(insert(File.__table__).values(id=file_id, tenant_id=tenant, filename=name, purpose="fine-tune",
                                               bytes=path.stat().st_size, sha256="0" * 64, storage_path=rel,
                                               n_examples=len(numbers)))
    return file_id


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


RESULTS_HEADER = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
FULL_KEYS = ("full_valid_loss", "full_valid_mean_token_accuracy", "base_full_valid_loss",
             "base_full_valid_mean_token_accuracy")


def _results_files(engine: Engine, tenant_id: str) -> list[Any]:
    t = File.__table__
    with engine.connect() as conn:
        return list(conn.execute(select(t).where(t.c.tenant_id == tenant_id, t.c.purpose == "fine-tune-results")))


def _read_results(settings: Settings, row: Any) -> list[dict[str, str]]:
    path = Path(settings.files_dir) / row.storage_path
    assert row.bytes == path.stat().st_size and row.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    reader = csv.DictReader(io.StringIO(path.read_text()))
    assert reader.fieldnames == RESULTS_HEADER
    return list(reader)


def test_succeeded_job_has_one_results_csv_and_full_validation(env: tuple[Settings, Engine]) -> None:
    settings, engine = env
    job_id = _create_job(settings, engine, 16, n_valid=6, max_steps=4, n_checkpoints=2, eval_steps=2,
                         max_eval_examples=2)
    assert run_job_here(engine, settings, job_id, NODE) == "succeeded"
    job = _job(engine, job_id)
    (results,) = _results_files(engine, job.tenant_id)
    assert job.result_files == [results.id]
    assert results.filename == "step_metrics.csv" and results.status == "processed" and results.deleted_at is None

    # one CSV row per metrics event, with the event's values; empty cells where a step did not evaluate
    metrics = [e.data for e in _events(engine, job_id) if e.type == "metrics"]
    rows = _read_results(settings, results)
    assert [int(r["step"]) for r in rows] == [m["step"] for m in metrics] == [1, 2, 3, 4]
    for row, m in zip(rows, metrics):
        assert float(row["train_loss"]) == m["train_loss"]
        assert float(row["train_accuracy"]) == m["train_mean_token_accuracy"]
        for key in ("valid_loss", "valid_mean_token_accuracy"):
            assert (float(row[key]) == m[key]) if key in m else row[key] == "", (key, row, m)
    assert [r["valid_loss"] != "" for r in rows] == [False, True, False, True]  # eval_steps=2

    # the whole validation file (6 examples; the evaluations saw 2), on the last step only, with
    # the base model beside it, in the last metrics event and the last checkpoint alike
    last = metrics[-1]
    assert set(FULL_KEYS) <= set(last) and not any(k in m for m in metrics[:-1] for k in FULL_KEYS)
    assert last["full_valid_loss"] != last["valid_loss"]
    with engine.connect() as conn:
        t = Checkpoint.__table__
        final = conn.execute(select(t).where(t.c.job_id == job_id).order_by(t.c.step_number.desc())).first()
    assert final.step_number == 4 and {k: final.metrics[k] for k in FULL_KEYS} == {k: last[k] for k in FULL_KEYS}
    assert "full validation loss" in [e for e in _events(engine, job_id) if e.type == "metrics"][-1].message

    # a redelivered message for the finished job adds nothing
    assert run_job_here(engine, settings, job_id, NODE) == "skipped"
    assert [r.id for r in _results_files(engine, job.tenant_id)] == [results.id]


class _Killed(BaseException):
    """The worker process dying while it publishes (what a signal handler raising SystemExit does)."""


def test_success_replayed_after_dying_mid_publish_leaves_one_results_file(
    env: tuple[Settings, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.training

    settings, engine = env
    job_id = _create_job(settings, engine, 12, n_valid=4, max_steps=2)

    def die(*args: Any, **kwargs: Any) -> Any:
        raise _Killed()

    # The closing events are built inside the publishing transaction, after the results row.
    with monkeypatch.context() as m:
        m.setattr(worker.training, "event_values", die)
        with pytest.raises(_Killed):
            run_job_here(engine, settings, job_id, NODE)
    job = _job(engine, job_id)
    assert job.status == "running" and job.result_files is None
    assert _results_files(engine, job.tenant_id) == []
    assert list((Path(settings.files_dir) / job.tenant_id).glob("*.csv")) == []  # its bytes went too

    # The job's next run resumes from the final checkpoint and publishes once.
    assert run_job_here(engine, settings, job_id, NODE) == "succeeded"
    job = _job(engine, job_id)
    (results,) = _results_files(engine, job.tenant_id)
    assert job.result_files == [results.id]
    assert [p.name for p in (Path(settings.files_dir) / job.tenant_id).glob("*.csv")] == [f"{results.id}.csv"]
    metrics = [e.data for e in _events(engine, job_id) if e.type == "metrics"]
    assert [m["step"] for m in metrics] == [1, 2] and set(FULL_KEYS) <= set(metrics[-1])
    assert [int(r["step"]) for r in _read_results(settings, results)] == [1, 2]
    assert "Fine-tuning job resumed" in [e.message for e in _events(engine, job_id)]


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
