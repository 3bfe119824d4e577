"""DPO through OpenAI's `method` object, preference files, and jobs that continue a fine-tuned model."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from qlora_core.store import BUNDLED_MODEL_ID
from service.database import session_scope
from service.db import Job
from tests.api.conftest import assert_error, jsonl, upload
from tests.api.test_job_outputs import _finish


def preference_jsonl(n: int) -> bytes:
    rows = [{"input": {"messages": [{"role": "system", "content": "Answer briefly."},
                                    {"role": "user", "content": f"What is {i} + {i}?"}]},
             "preferred_output": [{"role": "assistant", "content": f"{2 * i}"}],
             "non_preferred_output": [{"role": "assistant", "content": f"I think it might be {2 * i + 1}."}]}
            for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def create(client, tenant, **body):
    return client.post("/v1/fine_tuning/jobs", headers=tenant.headers, json={"model": BUNDLED_MODEL_ID, **body})


@pytest.fixture()
def pref_file(client, alice) -> str:
    resp = upload(client, alice, preference_jsonl(12), filename="prefs.jsonl")
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


@pytest.fixture()
def sft_file(client, alice) -> str:
    return upload(client, alice, jsonl(12)).json()["id"]


def test_preference_uploads_are_checked_line_by_line(client, alice) -> None:
    good = preference_jsonl(3).decode().splitlines()
    bad = [
        {"input": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
         "preferred_output": [{"role": "assistant", "content": "x"}],
         "non_preferred_output": [{"role": "assistant", "content": "y"}]},
        {"input": {"messages": [{"role": "user", "content": "q"}]},
         "preferred_output": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "z"}],
         "non_preferred_output": [{"role": "user", "content": "y"}]},
    ]
    body = "\n".join([*good, *(json.dumps(b) for b in bad)]) + "\n"
    err = assert_error(upload(client, alice, body.encode()), 400, "invalid_file_format", "file")
    assert "line 4: 'input' ends with an assistant message" in err["message"]
    assert "line 5: 'preferred_output' must be a list of exactly one assistant message" in err["message"]
    assert "line 5: 'non_preferred_output' message must have role 'assistant'" in err["message"]
    mixed = preference_jsonl(2) + jsonl(2)
    err = assert_error(upload(client, alice, mixed), 400, "invalid_file_format", "file")
    assert "mixes preference examples (first at line 1) with supervised ones: chat (first at line 3)" in err["message"]


def test_a_dpo_job_echoes_its_method_and_resolves_auto(client, alice, pref_file) -> None:
    resp = create(client, alice, training_file=pref_file,
                  method={"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto", "n_epochs": 2}}})
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["method"] == {"type": "dpo", "dpo": {"hyperparameters": {
        "beta": 0.1, "batch_size": 4, "learning_rate_multiplier": 1.0, "n_epochs": 2}}}
    assert job["hyperparameters"] is None  # the deprecated top-level field is for supervised jobs only
    assert job["qlora"]["method"] == "dpo" and job["qlora"]["dpo_beta"] == 0.1
    job = create(client, alice, training_file=pref_file, method={"type": "dpo", "dpo": {"hyperparameters": {
        "beta": 0.5, "batch_size": 2, "learning_rate_multiplier": 0.5}}}).json()
    assert job["method"]["dpo"]["hyperparameters"] == {"beta": 0.5, "batch_size": 2, "learning_rate_multiplier": 0.5,
                                                       "n_epochs": 3}
    # The memory estimate counts a pair as two rows.
    one = client.post("/v1/fine_tuning/jobs/estimate", headers=alice.headers, json={
        "model": BUNDLED_MODEL_ID, "training_file": pref_file, "method": {"type": "dpo"}}).json()
    assert one["qlora"]["method"] == "dpo"


@pytest.mark.parametrize(("method", "extra", "param"), [
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}, {}, "method.dpo.hyperparameters.beta"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": 2.5}}}, {}, "method.dpo.hyperparameters.beta"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 0}}}, {}, "method.dpo.hyperparameters.batch_size"),
    ({"type": "dpo"}, {"hyperparameters": {"n_epochs": 2}}, "hyperparameters"),
    ({"type": "dpo", "supervised": {}}, {}, "method.supervised"),
    ({"type": "dpo"}, {"qlora": {"packing": True}}, "qlora.packing"),
    ({"type": "reinforcement", "reinforcement": {}}, {}, "method.type"),
])
def test_bad_dpo_requests_name_the_parameter(client, alice, pref_file, method, extra, param) -> None:
    assert_error(create(client, alice, training_file=pref_file, method=method, **extra), 400, "invalid_value", param)


def test_the_file_must_suit_the_method(client, alice, pref_file, sft_file) -> None:
    err = assert_error(create(client, alice, training_file=sft_file, method={"type": "dpo"}), 400,
                       "invalid_file_format", "training_file")
    assert "supervised examples (chat format)" in err["message"] and "preference pairs" in err["message"]
    err = assert_error(create(client, alice, training_file=pref_file), 400, "invalid_file_format", "training_file")
    assert "preference pairs" in err["message"] and "method" in err["message"]
    assert_error(create(client, alice, training_file=pref_file, validation_file=sft_file, method={"type": "dpo"}),
                 400, "invalid_file_format", "validation_file")


def test_a_job_continues_a_fine_tuned_model_of_the_same_tenant(client, alice, bob, settings, sft_file,
                                                               pref_file) -> None:
    parent = create(client, alice, training_file=sft_file, qlora={"lora_r": 16, "lora_alpha": 32}).json()
    _finish(settings, parent["id"])
    ft = client.get(f"/v1/fine_tuning/jobs/{parent['id']}", headers=alice.headers).json()["fine_tuned_model"]
    resp = create(client, alice, model=ft, training_file=pref_file, method={"type": "dpo"})
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["model"] == ft  # echoed as asked, as OpenAI does
    assert job["qlora"]["lora_r"] == 16 and job["qlora"]["lora_alpha"] == 32  # the adapter's shape, inherited
    with session_scope(settings.database_url) as s:
        row = s.scalar(select(Job).where(Job.id == job["id"]))
        assert row.model == BUNDLED_MODEL_ID and row.requested_model == ft
        assert row.init_adapter == f"jobs/{parent['id']}/adapter" and row.parent_job_id == parent["id"]
    # A supervised job may continue it too.
    assert create(client, alice, model=ft, training_file=sft_file).status_code == 200
    # Another shape cannot load that adapter.
    assert_error(create(client, alice, model=ft, training_file=sft_file, qlora={"lora_r": 8}), 400, "invalid_value",
                 "qlora.lora_r")
    # Another tenant's fine-tuned model does not exist for bob.
    bob_file = upload(client, bob, preference_jsonl(12)).json()["id"]
    assert_error(create(client, bob, model=ft, training_file=bob_file, method={"type": "dpo"}), 400,
                 "model_not_found", "model")
    # While a job continues it, the model cannot be deleted; the job's adapter is its starting point.
    err = assert_error(client.delete(f"/v1/models/{ft}", headers=alice.headers), 400, "model_in_use", "model")
    assert job["id"] in err["message"] or "unfinished job" in err["message"]
