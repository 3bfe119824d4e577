"""`/v1/fine_tuning/jobs`: create (validation of every param), list, retrieve, cancel, limits."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from qlora_core.store import BUNDLED_MODEL_ID
from service.database import session_scope
from service.db import Job
from tests.api.conftest import assert_error, jsonl, upload


@pytest.fixture()
def train_file(client, alice) -> str:
    return upload(client, alice, jsonl(12)).json()["id"]


def create(client, tenant, **body):
    body.setdefault("model", BUNDLED_MODEL_ID)
    return client.post("/v1/fine_tuning/jobs", headers=tenant.headers, json=body)


def test_create_records_a_validating_job_with_resolved_config(client, alice, train_file, settings):
    resp = create(client, alice, training_file=train_file, suffix="demo", metadata={"team": "nlp"},
                  hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 0.5},
                  qlora={"lora_r": 8, "max_seq_length": 256, "max_steps": 3})
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] == "validating_files" and job["error"] is None and job["fine_tuned_model"] is None
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": job["hyperparameters"]}}
    assert job["qlora"]["lora_r"] == 8 and job["qlora"]["learning_rate"] == pytest.approx(1e-4)
    assert job["qlora"]["seed"] == job["seed"] and isinstance(job["seed"], int)
    assert job["metadata"] == {"team": "nlp"} and job["result_files"] == [] and job["integrations"] == []
    assert job["organization_id"].startswith("org-") and job["validation_file"] is None
    with session_scope(settings.database_url) as s:
        row = s.scalar(select(Job).where(Job.id == job["id"]))
        assert row.config["max_steps"] == 3 and row.enqueued_at is not None  # reached the embedded broker
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=alice.headers).json() == job


def test_method_form_and_explicit_seed(client, alice, train_file):
    resp = create(client, alice, training_file=train_file, seed=1234,
                  method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2, "n_epochs": "auto"}}})
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["seed"] == 1234 and job["hyperparameters"]["batch_size"] == 2 and job["hyperparameters"]["n_epochs"] == 3
    err = assert_error(create(client, alice, training_file=train_file, method={"type": "reinforcement"}), 400,
                       "invalid_value", "method.type")
    assert "'reinforcement'" in err["message"] and "not supported" in err["message"]
    assert_error(create(client, alice, training_file=train_file, method={"type": "dpo"}), 400,
                 "invalid_file_format", "training_file")  # a DPO job on a supervised file (tests/api/test_dpo_jobs.py)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": 51}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": 257}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier"),
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 99}}}},
         "method.supervised.hyperparameters.n_epochs"),
        ({"suffix": "x" * 65}, "suffix"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"qlora": {"lora_r": 0}}, "qlora.lora_r"),
        ({"qlora": {"quant_type": "int3"}}, "qlora.quant_type"),
        ({"qlora": {"lora_rank": 8}}, "qlora.lora_rank"),
        ({"hyperparameters": {"n_epochs": "lots"}}, "hyperparameters.n_epochs"),
        ({"validation_file": "file-doesnotexist"}, "validation_file"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_values_are_400_naming_the_param(client, alice, train_file, body, param):
    assert_error(create(client, alice, training_file=train_file, **body), 400, param=param)


def test_unknown_model_missing_file_and_too_few_examples(client, alice, train_file):
    assert_error(create(client, alice, training_file=train_file, model="nope/never"), 400, "model_not_found", "model")
    assert_error(create(client, alice, training_file="file-missing"), 400, "file_not_found", "training_file")
    small = upload(client, alice, jsonl(3)).json()["id"]
    err = assert_error(create(client, alice, training_file=small), 400, "invalid_n_examples", "training_file")
    assert "3 example" in err["message"]
    assert_error(client.post("/v1/fine_tuning/jobs", headers=alice.headers, json={"training_file": train_file}),
                 400, "missing_required_parameter", "model")


def test_list_newest_first_with_pagination(client, alice, train_file, settings):
    settings.max_concurrent_jobs = 10
    ids = [create(client, alice, training_file=train_file).json()["id"] for _ in range(3)]
    page = client.get("/v1/fine_tuning/jobs", headers=alice.headers, params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    rest = client.get("/v1/fine_tuning/jobs", headers=alice.headers,
                      params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and rest["has_more"] is False
    assert_error(client.get("/v1/fine_tuning/jobs", headers=alice.headers, params={"after": "ftjob-nope"}), 400,
                 param="after")
    assert_error(client.get("/v1/fine_tuning/jobs", headers=alice.headers, params={"limit": 0}), 400, param="limit")


def test_cancel_queued_is_immediate_running_is_cooperative(client, alice, train_file, settings):
    settings.max_concurrent_jobs = 10
    a = create(client, alice, training_file=train_file).json()["id"]
    resp = client.post(f"/v1/fine_tuning/jobs/{a}/cancel", headers=alice.headers)
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled" and resp.json()["finished_at"]
    assert client.post(f"/v1/fine_tuning/jobs/{a}/cancel", headers=alice.headers).json()["status"] == "cancelled"

    b = create(client, alice, training_file=train_file).json()["id"]
    with session_scope(settings.database_url) as s:
        s.execute(update(Job).where(Job.id == b).values(status="running"))
    resp = client.post(f"/v1/fine_tuning/jobs/{b}/cancel", headers=alice.headers)
    assert resp.status_code == 200 and resp.json()["status"] == "running"
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(Job.cancel_requested_at).where(Job.id == b)) is not None
        s.execute(update(Job).where(Job.id == b).values(status="succeeded"))
    assert_error(client.post(f"/v1/fine_tuning/jobs/{b}/cancel", headers=alice.headers), 400, "job_not_cancellable")


def test_concurrent_unfinished_jobs_limit_is_429(client, alice, train_file, settings):
    settings.max_concurrent_jobs = 2
    first = [create(client, alice, training_file=train_file).json()["id"] for _ in range(2)]
    assert_error(create(client, alice, training_file=train_file), 429, "concurrent_jobs_limit")
    client.post(f"/v1/fine_tuning/jobs/{first[0]}/cancel", headers=alice.headers)
    assert create(client, alice, training_file=train_file).status_code == 200


def test_file_in_use_cannot_be_deleted(client, alice, train_file):
    job = create(client, alice, training_file=train_file).json()["id"]
    assert_error(client.delete(f"/v1/files/{train_file}", headers=alice.headers), 400, "file_in_use")
    client.post(f"/v1/fine_tuning/jobs/{job}/cancel", headers=alice.headers)
    assert client.delete(f"/v1/files/{train_file}", headers=alice.headers).status_code == 200
