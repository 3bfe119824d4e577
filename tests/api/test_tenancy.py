"""Tenant isolation: every endpoint answers 404 for another tenant's object and lists only one's own."""

from __future__ import annotations

from sqlalchemy import update

from qlora_core.store import BUNDLED_MODEL_ID
from service.database import session_scope
from service.db import Job
from tests.api.conftest import assert_error, jsonl, upload
from tests.api.test_job_outputs import _finish


def test_other_tenants_objects_are_404_everywhere(client, alice, bob, settings):
    fid = upload(client, alice, jsonl(10)).json()["id"]
    jid = client.post("/v1/fine_tuning/jobs", headers=alice.headers,
                      json={"model": BUNDLED_MODEL_ID, "training_file": fid}).json()["id"]
    # A synthetic succeeded job (_finish writes the worker's rows straight into the database, nothing
    # is trained): every endpoint below then has a real object to refuse to bob, and tenancy is a
    # property of the rows, not of how a worker made them.
    ckpts = _finish(settings, jid)
    job = client.get(f"/v1/fine_tuning/jobs/{jid}", headers=alice.headers).json()
    ft, (results,) = job["fine_tuned_model"], job["result_files"]
    own = [
        ("GET", f"/v1/files/{fid}"), ("GET", f"/v1/files/{fid}/content"),
        ("GET", f"/v1/files/{results}"), ("GET", f"/v1/files/{results}/content"),
        ("GET", f"/v1/fine_tuning/jobs/{jid}"), ("GET", f"/v1/fine_tuning/jobs/{jid}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{jid}/checkpoints"), ("GET", f"/v1/fine_tuning/jobs/{jid}/adapter"),
        ("GET", f"/v1/fine_tuning/jobs/{jid}/checkpoints/{ckpts[0]}/adapter"),
        ("GET", f"/v1/models/{ft}"),
    ]
    for method, path in own:
        assert client.request(method, path, headers=alice.headers).status_code == 200, path
        assert_error(client.request(method, path, headers=bob.headers), 404)
    assert_error(client.post(f"/v1/fine_tuning/jobs/{jid}/cancel", headers=bob.headers), 404)
    assert_error(client.delete(f"/v1/files/{fid}", headers=bob.headers), 404)
    assert_error(client.delete(f"/v1/files/{results}", headers=bob.headers), 404)
    assert_error(client.delete(f"/v1/models/{ft}", headers=bob.headers), 404, "model_not_found")
    assert_error(client.get(f"/v1/fine_tuning/jobs/{jid}/events", headers=bob.headers, params={"stream": "true"}), 404)
    # bob cannot train on alice's file, nor use her ids as cursors
    assert_error(client.post("/v1/fine_tuning/jobs", headers=bob.headers,
                             json={"model": BUNDLED_MODEL_ID, "training_file": fid}), 400, "file_not_found")
    assert_error(client.get("/v1/files", headers=bob.headers, params={"after": fid}), 400, param="after")
    assert client.get("/v1/files", headers=bob.headers).json()["data"] == []
    assert client.get("/v1/fine_tuning/jobs", headers=bob.headers).json()["data"] == []
    bob_models = [m["id"] for m in client.get("/v1/models", headers=bob.headers).json()["data"]]
    assert bob_models == [BUNDLED_MODEL_ID]
    with session_scope(settings.database_url) as s:
        s.execute(update(Job).where(Job.id == jid).values(status="running"))
    assert_error(client.post(f"/v1/fine_tuning/jobs/{jid}/cancel", headers=bob.headers), 404)


def test_models_list_base_and_own_fine_tuned(client, alice, settings):
    data = client.get("/v1/models", headers=alice.headers).json()
    assert data["object"] == "list"
    base = next(m for m in data["data"] if m["id"] == BUNDLED_MODEL_ID)
    assert base["object"] == "model" and base["owned_by"] == "system" and isinstance(base["created"], int)
    got = client.get(f"/v1/models/{BUNDLED_MODEL_ID}", headers=alice.headers)
    assert got.status_code == 200 and got.json() == base
    assert_error(client.get("/v1/models/no-such-model", headers=alice.headers), 404)
