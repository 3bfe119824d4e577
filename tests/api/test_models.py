"""`/v1/models`: a tenant's fine-tuned models beside the base models; retrieve; delete as OpenAI does.

The succeeded jobs are synthetic (`_finish` writes the rows and marker adapter files a worker
writes; nothing is trained): what is under test is what the API lists, serves and removes.
Deleting goes through the official `openai` SDK against a live uvicorn.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import update

from qlora_core.store import BUNDLED_MODEL_ID
from service.database import session_scope
from service.db import Job
from tests.api.conftest import assert_error, jsonl, upload
from tests.api.test_job_outputs import _finish


def _succeeded_job(client, tenant, settings) -> tuple[dict, list[str]]:
    """A synthetic succeeded job of `tenant`: its job object (as the API shows it) and checkpoint ids."""
    fid = upload(client, tenant, jsonl(10)).json()["id"]
    jid = client.post("/v1/fine_tuning/jobs", headers=tenant.headers,
                      json={"model": BUNDLED_MODEL_ID, "training_file": fid}).json()["id"]
    ckpts = _finish(settings, jid)
    return client.get(f"/v1/fine_tuning/jobs/{jid}", headers=tenant.headers).json(), ckpts


def _adapter_files(settings, job_id: str) -> list[Path]:
    """The final adapter's files on disk: the directory's PEFT files and the downloadable archive."""
    root = Path(settings.artifacts_dir) / "jobs" / job_id
    return [root / "adapter" / "adapter_config.json", root / "adapter" / "adapter_model.safetensors",
            root / "adapter.tar.gz"]


def test_list_and_retrieve_own_fine_tuned_models(client, alice, bob, settings):
    job, _ = _succeeded_job(client, alice, settings)
    ft = job["fine_tuned_model"]
    assert ft.startswith(f"ft:{BUNDLED_MODEL_ID}:alice::")
    data = client.get("/v1/models", headers=alice.headers).json()["data"]
    assert [m["id"] for m in data] == [BUNDLED_MODEL_ID, ft]
    # `created` is the job's finished_at (1 here), not when the model row was written (now).
    assert data[1] == {"id": ft, "object": "model", "created": job["finished_at"], "owned_by": job["organization_id"]}
    assert job["finished_at"] == 1
    got = client.get(f"/v1/models/{ft}", headers=alice.headers)
    assert got.status_code == 200 and got.json() == data[1]
    # Never another tenant's, not even by exact name.
    assert [m["id"] for m in client.get("/v1/models", headers=bob.headers).json()["data"]] == [BUNDLED_MODEL_ID]
    assert_error(client.get(f"/v1/models/{ft}", headers=bob.headers), 404, "model_not_found", "model")
    # Only a succeeded job's model is a model.
    with session_scope(settings.database_url) as s:
        s.execute(update(Job).where(Job.id == job["id"]).values(status="failed"))
    assert [m["id"] for m in client.get("/v1/models", headers=alice.headers).json()["data"]] == [BUNDLED_MODEL_ID]
    assert_error(client.get(f"/v1/models/{ft}", headers=alice.headers), 404, "model_not_found")


def test_sdk_deletes_a_fine_tuned_model_and_its_adapter_files(server, client, alice, settings):
    job, ckpts = _succeeded_job(client, alice, settings)
    ft = job["fine_tuned_model"]
    auth = {"Authorization": f"Bearer {alice.key}"}
    adapter_url = f"{server}/v1/fine_tuning/jobs/{job['id']}/adapter"
    assert httpx.get(adapter_url, headers=auth).status_code == 200  # also caches the archive on disk
    files = _adapter_files(settings, job["id"])
    assert all(p.is_file() for p in files)
    sdk = openai.OpenAI(base_url=f"{server}/v1", api_key=alice.key, max_retries=0)
    assert ft in [m.id for m in sdk.models.list()]
    assert sdk.models.retrieve(ft).owned_by == job["organization_id"]

    deleted = sdk.models.delete(ft)
    assert (deleted.id, deleted.object, deleted.deleted) == (ft, "model", True)
    assert [p for p in files if p.exists()] == []
    assert ft not in [m.id for m in sdk.models.list()]
    with pytest.raises(openai.NotFoundError) as e:
        sdk.models.retrieve(ft)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        sdk.models.delete(ft)
    assert e.value.code == "model_not_found"
    # The job stays and still names its model; its adapter is gone, and says why.
    assert sdk.fine_tuning.jobs.retrieve(job["id"]).fine_tuned_model == ft
    gone = httpx.get(adapter_url, headers=auth)
    err = assert_error(gone, 410, "model_deleted")
    assert "deleted" in err["message"] and ft in err["message"]
    # Checkpoints are separate files and separate models: kept, as on OpenAI.
    ckpt = httpx.get(f"{server}/v1/fine_tuning/jobs/{job['id']}/checkpoints/{ckpts[-1]}/adapter", headers=auth)
    assert ckpt.status_code == 200
    assert (Path(settings.artifacts_dir) / "jobs" / job["id"] / "checkpoints" / "step-00000003"
            / "adapter_model.safetensors").read_bytes() == b"ckpt3"


def test_base_models_cannot_be_deleted(server, alice):
    sdk = openai.OpenAI(base_url=f"{server}/v1", api_key=alice.key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as e:
        sdk.models.delete(BUNDLED_MODEL_ID)
    assert e.value.code == "model_not_deletable" and "qlora models" in e.value.message
    assert BUNDLED_MODEL_ID in [m.id for m in sdk.models.list()]
    with pytest.raises(openai.NotFoundError) as e:
        sdk.models.delete("ft:no-such-model")
    assert e.value.code == "model_not_found"


def test_another_tenants_model_is_404_and_untouched(client, alice, bob, settings):
    alice_job, _ = _succeeded_job(client, alice, settings)
    bob_job, _ = _succeeded_job(client, bob, settings)
    alice_ft, bob_ft = alice_job["fine_tuned_model"], bob_job["fine_tuned_model"]
    for job, tenant in ((alice_job, alice), (bob_job, bob)):  # cache both archives
        assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter", headers=tenant.headers).status_code == 200

    assert_error(client.delete(f"/v1/models/{alice_ft}", headers=bob.headers), 404, "model_not_found", "model")
    assert all(p.is_file() for p in _adapter_files(settings, alice_job["id"]))
    assert client.get(f"/v1/models/{alice_ft}", headers=alice.headers).status_code == 200

    assert client.delete(f"/v1/models/{alice_ft}", headers=alice.headers).json()["deleted"] is True
    assert all(p.is_file() for p in _adapter_files(settings, bob_job["id"]))
    assert [m["id"] for m in client.get("/v1/models", headers=bob.headers).json()["data"]] == [BUNDLED_MODEL_ID, bob_ft]
    assert client.get(f"/v1/fine_tuning/jobs/{bob_job['id']}/adapter", headers=bob.headers).status_code == 200


def test_a_failed_file_removal_keeps_the_model(client, alice, settings, monkeypatch):
    """A 200 means the files are gone: when removing them fails, the model stays listed and a retry works."""
    job, _ = _succeeded_job(client, alice, settings)
    ft = job["fine_tuned_model"]

    def refuse(*_args, **_kwargs):
        raise PermissionError("read-only artifact store")

    from api.routes import models

    real = models.delete_adapter
    monkeypatch.setattr(models, "delete_adapter", refuse)
    assert_error(client.delete(f"/v1/models/{ft}", headers=alice.headers), 500)
    assert client.get(f"/v1/models/{ft}", headers=alice.headers).status_code == 200
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter", headers=alice.headers).status_code == 200
    monkeypatch.setattr(models, "delete_adapter", real)
    assert client.delete(f"/v1/models/{ft}", headers=alice.headers).json() == {"id": ft, "object": "model",
                                                                                  "deleted": True}


@pytest.mark.parametrize("bad", ["jobs/{job}", "jobs/{job}/checkpoints", ".", "../../outside"])
def test_a_bad_adapter_path_never_removes_more_than_the_adapter(client, alice, settings, bad):
    """A row pointing at the job's directory, its checkpoints, the store or outside it: nothing is removed."""
    job, ckpts = _succeeded_job(client, alice, settings)
    bad = bad.format(job=job["id"])
    with session_scope(settings.database_url) as s:
        s.execute(update(Job).where(Job.id == job["id"]).values(adapter_path=bad))
    before = sorted(p for p in Path(settings.artifacts_dir).rglob("*"))
    assert_error(client.delete(f"/v1/models/{job['fine_tuned_model']}", headers=alice.headers), 500)
    assert sorted(p for p in Path(settings.artifacts_dir).rglob("*")) == before
    assert client.get(f"/v1/models/{job['fine_tuned_model']}", headers=alice.headers).status_code == 200
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/{ckpts[0]}/adapter",
                      headers=alice.headers).status_code == 200
