"""The fit check at job creation (api/fitcheck.py): estimate recorded, refused when no worker fits.

Worker rows are inserted straight into the `workers` table: that is exactly the data a running
worker writes (worker/main.py), and no real worker process is needed to test what the API reads.
The base model is the tiny random Llama imported into the test's model store.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from service.objectstore import get_storage
from api.fitcheck import GIB, estimate_job_memory, model_config_json
from qlora_core.store import BUNDLED_MODEL_ID, ModelStore
from service.database import session_scope
from service.db import Job, Worker
from tests.api.conftest import assert_error, jsonl, upload

TINY_ID = "test/tiny-llama"


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A model store holding the tiny Llama, imported once for the module."""
    root = tmp_path_factory.mktemp("fit-store")
    ModelStore(root).import_model(tiny_model_dir, TINY_ID)
    return root


@pytest.fixture()
def tiny(settings, tiny_store: Path) -> str:
    for d in tiny_store.iterdir():
        if d.is_dir() and not d.name.startswith("."):
            shutil.copytree(d, Path(settings.models_dir) / d.name)
    return TINY_ID


@pytest.fixture()
def train_file(client, alice) -> str:
    return upload(client, alice, jsonl(12)).json()["id"]


def add_worker(settings, name: str, memory_bytes: int, seen_s_ago: int = 0, alive: bool = True,
               compute_dtype: str | None = None, device: str | None = None) -> None:
    t = int(time.time())
    with session_scope(settings.database_url) as s:
        s.add(Worker(id=name, device=device or f"cuda:0 ({name})", device_memory_bytes=memory_bytes,
                     started_at=t - 3600, last_seen_at=t - seen_s_ago, alive=alive, compute_dtype=compute_dtype))


def create(client, tenant, model: str, training_file: str, batch_size: int = 8, **qlora):
    qlora.setdefault("max_seq_length", 512)
    return client.post("/v1/fine_tuning/jobs", headers=tenant.headers, json={
        "model": model, "training_file": training_file, "hyperparameters": {"batch_size": batch_size},
        "qlora": qlora})


def expected_bytes(settings, model: str, job: dict, device: str = "cpu") -> int:
    with session_scope(settings.database_url) as s:
        cfg = s.scalar(select(Job.config).where(Job.id == job["id"]))
    return estimate_job_memory(model_config_json(get_storage(settings), model), cfg, device=device)["total_bytes"]


def test_no_worker_reported_accepts_and_records_the_estimate(client, alice, tiny, train_file, settings):
    resp = create(client, alice, tiny, train_file)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["estimated_memory_bytes"] == expected_bytes(settings, tiny, job)
    # Twice the batch needs more memory: the estimate follows the job's own config.
    bigger = create(client, alice, tiny, train_file, batch_size=16).json()
    assert bigger["estimated_memory_bytes"] > job["estimated_memory_bytes"]


def test_refused_when_no_live_worker_fits(client, alice, tiny, train_file, settings):
    need = create(client, alice, tiny, train_file).json()["estimated_memory_bytes"]
    add_worker(settings, "small-gpu", need // 2)
    add_worker(settings, "big-but-silent", need * 100, seen_s_ago=3600)  # stopped heart-beating long ago
    add_worker(settings, "big-but-dead", need * 100, alive=False)
    err = assert_error(create(client, alice, tiny, train_file), 400, "insufficient_device_memory")
    assert f"{need / GIB:.1f} GiB" in err["message"] and "4-bit base" in err["message"]
    assert "cuda:0 (small-gpu)" in err["message"] and f"{need // 2 / GIB:.1f} GiB" in err["message"]
    assert err["param"] in ("hyperparameters.batch_size", "qlora.max_seq_length", "qlora.lora_r",
                            "qlora.gradient_checkpointing", "model")
    jobs = client.get("/v1/fine_tuning/jobs", headers=alice.headers).json()["data"]
    assert len(jobs) == 1  # only the first one, made before any worker reported


def test_largest_live_worker_decides_and_a_smaller_job_fits(client, alice, tiny, train_file, settings):
    small = create(client, alice, tiny, train_file, batch_size=1, max_seq_length=64).json()["estimated_memory_bytes"]
    big = create(client, alice, tiny, train_file, batch_size=64, max_seq_length=2048, gradient_checkpointing=False)
    big_need = big.json()["estimated_memory_bytes"]
    assert small < big_need
    client.post(f"/v1/fine_tuning/jobs/{big.json()['id']}/cancel", headers=alice.headers)
    add_worker(settings, "tiny-gpu", small // 2)
    add_worker(settings, "mid-gpu", (small + big_need) // 2)
    refused = create(client, alice, tiny, train_file, batch_size=64, max_seq_length=2048, gradient_checkpointing=False)
    err = assert_error(refused, 400, "insufficient_device_memory", param="qlora.gradient_checkpointing")
    assert "cuda:0 (mid-gpu)" in err["message"]
    ok = create(client, alice, tiny, train_file, batch_size=1, max_seq_length=64)
    assert ok.status_code == 200, ok.text
    # Recorded as the GPU worker that holds it computes it (every block checkpointed: at most `small`).
    assert ok.json()["estimated_memory_bytes"] == expected_bytes(settings, tiny, ok.json(), "cuda") <= small


def test_method_form_names_its_batch_size(client, alice, tiny, train_file, settings):
    add_worker(settings, "one-byte-gpu", 1)
    resp = client.post("/v1/fine_tuning/jobs", headers=alice.headers, json={
        "model": tiny, "training_file": train_file,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 8}}}})
    err = assert_error(resp, 400, "insufficient_device_memory")
    assert err["param"].startswith(("method.supervised.hyperparameters.", "qlora.", "model"))


def test_auto_dtype_is_estimated_as_each_worker_would_compute(client, alice, tiny, train_file, settings):
    """compute_dtype "auto" is bf16 on one worker and fp32 on another: each is checked in its own."""
    shape = dict(batch_size=32, max_seq_length=2048, gradient_checkpointing=False)
    config_json = model_config_json(get_storage(settings), tiny)
    cfg = create(client, alice, tiny, train_file, **shape).json()["qlora"]
    assert cfg["compute_dtype"] == "auto"
    bf16 = estimate_job_memory(config_json, cfg, "bfloat16")["total_bytes"]
    fp32 = estimate_job_memory(config_json, cfg, "float32")["total_bytes"]
    assert bf16 < fp32  # activations and logits are half the size
    between = (bf16 + fp32) // 2
    add_worker(settings, "fp32-cpu", between, compute_dtype="float32", device="cpu (2 cores)")
    err = assert_error(create(client, alice, tiny, train_file, **shape), 400, "insufficient_device_memory")
    assert "computing in float32" in err["message"]
    add_worker(settings, "bf16-gpu", between, compute_dtype="bfloat16")
    ok = create(client, alice, tiny, train_file, **shape)
    assert ok.status_code == 200, ok.text
    assert ok.json()["estimated_memory_bytes"] == bf16
    # An explicit dtype is what every worker would use: float32 fits neither.
    assert_error(create(client, alice, tiny, train_file, compute_dtype="float32", **shape), 400,
                 "insufficient_device_memory")


def test_a_gpu_worker_is_estimated_with_the_gpus_checkpointing(client, alice, tiny, train_file, settings):
    """The engine checkpoints every block on a GPU and fewer on a CPU (qlora_core/quant.py,
    auto_checkpoint_fraction): a job that a CPU worker's RAM cannot hold may fit a GPU of that size."""
    shape = dict(batch_size=32, max_seq_length=2048)
    config_json = model_config_json(get_storage(settings), tiny)
    cfg = create(client, alice, tiny, train_file, **shape).json()["qlora"]
    on_cpu = estimate_job_memory(config_json, cfg, "bfloat16", "cpu")["total_bytes"]
    on_gpu = estimate_job_memory(config_json, cfg, "bfloat16", "cuda")["total_bytes"]
    assert on_gpu < on_cpu  # every block checkpointed keeps fewer activations
    between = (on_gpu + on_cpu) // 2
    add_worker(settings, "bf16-cpu", between, compute_dtype="bfloat16", device="cpu (2 cores)")
    err = assert_error(create(client, alice, tiny, train_file, **shape), 400, "insufficient_device_memory")
    assert "cpu (2 cores)" in err["message"] and f"{on_cpu / GIB:.1f} GiB" in err["message"]
    add_worker(settings, "bf16-gpu", between, compute_dtype="bfloat16")
    ok = create(client, alice, tiny, train_file, **shape)
    assert ok.status_code == 200, ok.text
    assert ok.json()["estimated_memory_bytes"] == on_gpu


def test_estimate_answers_without_creating_a_job(client, alice, tiny, train_file, settings):
    """POST /jobs/estimate (the console's memory preview) gives what creating would record, and creates nothing."""
    add_worker(settings, "big-gpu", 10 * GIB, compute_dtype="bfloat16")
    body = {"model": tiny, "training_file": train_file, "hyperparameters": {"batch_size": 2}}
    est = client.post("/v1/fine_tuning/jobs/estimate", headers=alice.headers, json=body)
    assert est.status_code == 200, est.text
    est = est.json()
    assert est["object"] == "fine_tuning.job.estimate"
    assert est["workers"] == [{"device": "cuda:0 (big-gpu)", "device_memory_bytes": 10 * GIB,
                               "compute_dtype": "bfloat16"}]
    assert est["hyperparameters"]["batch_size"] == 2 and est["qlora"]["batch_size"] == 2
    assert client.get("/v1/fine_tuning/jobs", headers=alice.headers).json()["data"] == []
    job = client.post("/v1/fine_tuning/jobs", headers=alice.headers, json=body).json()
    assert est["estimated_memory_bytes"] == job["estimated_memory_bytes"] > 0


def test_estimate_refuses_as_creating_would(client, alice, bob, tiny, train_file, settings):
    add_worker(settings, "one-byte-gpu", 1)
    body = {"model": tiny, "training_file": train_file}
    assert_error(client.post("/v1/fine_tuning/jobs/estimate", headers=alice.headers, json=body), 400,
                 "insufficient_device_memory")
    # another tenant's file is not there for bob, as when creating
    assert_error(client.post("/v1/fine_tuning/jobs/estimate", headers=bob.headers, json=body), 400, "file_not_found")
    assert_error(client.post("/v1/fine_tuning/jobs/estimate", headers=alice.headers,
                             json={**body, "hyperparameters": {"n_epochs": 0}}), 400, "invalid_value")


def test_the_bundled_model_not_yet_imported_is_estimated_from_its_gguf(settings):
    """A fresh store: the API reads the bundled model's shape from the GGUF header (the worker imports it later)."""
    storage = get_storage(settings)
    assert not storage.exists("models", BUNDLED_MODEL_ID.replace("/", "--") + "/config.json")
    cfg = model_config_json(storage, BUNDLED_MODEL_ID)
    # SmolLM2-135M-Instruct's config.json
    assert cfg == {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                   "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}
