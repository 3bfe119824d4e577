"""Events (list and SSE), checkpoints, adapter downloads and the results file of a job.

The rows a worker writes (events, checkpoints, a succeeded status, the adapter directory) are
written here directly, as the worker would; the end-to-end path is in tests/e2e.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from sqlalchemy import select, update

from qlora_core.store import BUNDLED_MODEL_ID
from service.database import get_engine, session_scope
from service.db import Checkpoint, File, Job, JobEvent, Model, Tenant, new_id
from tests.api.conftest import assert_error, jsonl, upload
from service.objectstore import get_storage
from worker.results import write_results_file


@pytest.fixture()
def job_id(client, alice) -> str:
    fid = upload(client, alice, jsonl(10)).json()["id"]
    resp = client.post("/v1/fine_tuning/jobs", headers=alice.headers, json={"model": BUNDLED_MODEL_ID, "training_file": fid})
    return resp.json()["id"]


def _write_adapter(root: Path, marker: bytes) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (root / "adapter_model.safetensors").write_bytes(marker)
    (root / "state.pt").write_bytes(b"optimizer state must not be shipped")


def _finish(settings, job_id: str, steps: int = 3) -> list[str]:
    """Make `job_id` a synthetic succeeded job: no worker runs, nothing is trained.

    The rows and files a worker writes for a job that trained `steps` steps are written straight
    into the database and the artifacts dir: `steps` metrics events, checkpoints at steps 2 and 3
    with their adapter directories, the final adapter, the job row set to `succeeded` with
    `fine_tuned_model` (named as worker/training.py names it), `finished_at`, `trained_tokens` and
    `result_files`, the tenant's `models` row for it, and its results CSV (made from those events
    by the worker's own `worker.results.write_results_file`). The adapters hold marker bytes, not
    weights. Enough for tests of what the API serves from those rows (listing, paging, tenancy,
    downloads); the real worker writing them is tested in tests/worker and end to end in tests/e2e.

    Returns:
        The checkpoint ids, oldest (step 2) first.
    """
    ckpts = []
    with session_scope(settings.database_url) as s:
        tenant_id, tenant_name = s.execute(select(Job.tenant_id, Tenant.name).join(Tenant, Tenant.id == Job.tenant_id)
                                           .where(Job.id == job_id)).one()
        for step in range(1, steps + 1):
            s.add(JobEvent(id=new_id("ftevent"), job_id=job_id, type="metrics", message=f"Step {step}/{steps}",
                           data={"step": step, "train_loss": 2.0 / step}, dedup_key=f"metrics:{step}"))
        for step in (2, 3):
            rel = f"jobs/{job_id}/checkpoints/step-{step:08d}"
            _write_adapter(Path(settings.artifacts_dir) / rel, f"ckpt{step}".encode())
            cid = new_id("ftckpt")
            ckpts.append(cid)
            s.add(Checkpoint(id=cid, job_id=job_id, tenant_id=tenant_id, step_number=step,
                             metrics={"step": step, "train_loss": 1.0}, fine_tuned_model_checkpoint=f"ft:x:ckpt-step-{step}",
                             adapter_path=rel))
        final = f"jobs/{job_id}/adapter"
        _write_adapter(Path(settings.artifacts_dir) / final, b"final")
        ft = f"ft:{BUNDLED_MODEL_ID}:{tenant_name}::{job_id.split('-', 1)[-1]}"
        s.execute(update(Job).where(Job.id == job_id).values(status="succeeded", adapter_path=final,
                                                           fine_tuned_model=ft, finished_at=1, trained_tokens=99))
        # created_at is left to its default (now), unlike the worker's (= finished_at): the API's
        # `created` must come from the job (tests/api/test_models.py).
        s.add(Model(id=ft, tenant_id=tenant_id, kind="fine_tuned", base_model=BUNDLED_MODEL_ID, job_id=job_id,
                    artifact_path=final, owned_by=tenant_id))
    results = write_results_file(get_engine(settings.database_url), get_storage(settings), job_id, tenant_id)
    with session_scope(settings.database_url) as s:
        s.add(File(**results))
        s.execute(update(Job).where(Job.id == job_id).values(result_files=[results["id"]]))
    return ckpts


def test_events_newest_first_and_paginated(client, alice, settings, job_id):
    _finish(settings, job_id)
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=alice.headers).json()
    assert events["object"] == "list" and not events["has_more"]
    data = events["data"]
    assert [e["type"] for e in data[:3]] == ["metrics"] * 3 and data[0]["data"]["step"] == 3
    assert data[-1]["message"].startswith("Created fine-tuning job") and data[-1]["type"] == "message"
    assert all(e["object"] == "fine_tuning.job.event" and e["level"] == "info" for e in data)
    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=alice.headers,
                      params={"limit": 2, "after": data[0]["id"]}).json()
    assert [e["id"] for e in page["data"]] == [e["id"] for e in data[1:3]] and page["has_more"]


def test_event_stream_is_sse_in_order_and_ends_with_the_job(client, alice, settings, job_id):
    _finish(settings, job_id)
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", headers=alice.headers,
                       params={"stream": "true"}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        body = resp.read().decode()
    payloads = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
    assert payloads[0]["message"].startswith("Created fine-tuning job")
    assert [p["data"]["step"] for p in payloads if p["type"] == "metrics"] == [1, 2, 3]


def test_checkpoints_newest_first(client, alice, settings, job_id):
    _finish(settings, job_id)
    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=alice.headers).json()
    assert [c["step_number"] for c in page["data"]] == [3, 2] and not page["has_more"]
    c = page["data"][0]
    assert c["object"] == "fine_tuning.job.checkpoint" and c["fine_tuning_job_id"] == job_id
    assert c["metrics"]["step"] == 3 and c["fine_tuned_model_checkpoint"] == "ft:x:ckpt-step-3"
    rest = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=alice.headers,
                      params={"limit": 1, "after": c["id"]}).json()
    assert [x["step_number"] for x in rest["data"]] == [2]


def _members(resp) -> dict[str, bytes]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_adapter_downloads(client, alice, settings, job_id):
    assert_error(client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", headers=alice.headers), 400, "adapter_not_ready")
    ckpts = _finish(settings, job_id)
    files = _members(client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", headers=alice.headers))
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert files["adapter_model.safetensors"] == b"final"
    files = _members(client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{ckpts[0]}/adapter", headers=alice.headers))
    assert files["adapter_model.safetensors"] == b"ckpt2"
    assert_error(client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/ftckpt-nope/adapter", headers=alice.headers), 404)


def test_adapter_path_outside_the_store_is_never_served(client, alice, settings, job_id):
    _finish(settings, job_id)
    with session_scope(settings.database_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(adapter_path="../../../etc"))
    (Path(settings.artifacts_dir) / f"jobs/{job_id}/adapter.tar.gz").unlink(missing_ok=True)
    assert_error(client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", headers=alice.headers), 410, "artifact_missing")


RESULTS_HEADER = "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"


def test_results_file_is_a_file_of_the_tenant(client, alice, bob, settings, job_id):
    """A succeeded job's `result_files` names a CSV that reads, lists and deletes like any file,
    is the tenant's alone, and cannot be trained on."""
    _finish(settings, job_id)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=alice.headers).json()
    assert len(job["result_files"]) == 1
    rid = job["result_files"][0]
    meta = client.get(f"/v1/files/{rid}", headers=alice.headers).json()
    assert meta["object"] == "file" and meta["purpose"] == "fine-tune-results"
    assert meta["filename"] == "step_metrics.csv" and meta["status"] == "processed"
    resp = client.get(f"/v1/files/{rid}/content", headers=alice.headers)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv")
    # plain CSV, one row per metrics event (_finish's: train_loss 2/step, no evaluation)
    assert resp.text.splitlines() == [RESULTS_HEADER, "1,2.0,,,", "2,1.0,,,", "3,0.6666666666666666,,,"]
    assert meta["bytes"] == len(resp.content)
    listed = client.get("/v1/files", headers=alice.headers, params={"purpose": "fine-tune-results"}).json()["data"]
    assert [f["id"] for f in listed] == [rid]
    assert rid in [f["id"] for f in client.get("/v1/files", headers=alice.headers).json()["data"]]

    for path in (f"/v1/files/{rid}", f"/v1/files/{rid}/content"):
        assert_error(client.get(path, headers=bob.headers), 404)
    assert_error(client.delete(f"/v1/files/{rid}", headers=bob.headers), 404)
    for param in ("training_file", "validation_file"):
        fid = upload(client, alice, jsonl(10)).json()["id"]
        body = {"model": BUNDLED_MODEL_ID, "training_file": fid, param: rid}
        err = assert_error(client.post("/v1/fine_tuning/jobs", headers=alice.headers, json=body), 400,
                           "invalid_file_purpose", param)
        assert "fine-tune-results" in err["message"]

    deleted = client.delete(f"/v1/files/{rid}", headers=alice.headers).json()
    assert deleted == {"id": rid, "object": "file", "deleted": True}
    assert_error(client.get(f"/v1/files/{rid}", headers=alice.headers), 404)
    assert_error(client.get(f"/v1/files/{rid}/content", headers=alice.headers), 404)
    assert client.get("/v1/files", headers=alice.headers, params={"purpose": "fine-tune-results"}).json()["data"] == []
