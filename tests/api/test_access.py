"""Who may see what: revocation through the CLI, id guessing across tenants in downloads, checkpoints
and event streams (api/deps.py, api/routes/job_outputs.py).

tests/api/test_tenancy.py checks each endpoint with another tenant's ids; here the guesses are
mixed: one's own job with another tenant's checkpoint, another tenant's event or checkpoint ids
as pagination cursors and as `Last-Event-ID` when resuming a stream.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from qlora_core.store import BUNDLED_MODEL_ID
from service.database import session_scope
from service.db import Checkpoint, Job, JobEvent, new_id
from tests.api.conftest import assert_error, jsonl, upload
from tests.api.test_job_outputs import _finish, _write_adapter


def _job(client, tenant) -> str:
    fid = upload(client, tenant, jsonl(10)).json()["id"]
    resp = client.post("/v1/fine_tuning/jobs", headers=tenant.headers, json={"model": BUNDLED_MODEL_ID,
                                                                            "training_file": fid})
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def _own_checkpoint(settings, job_id: str, payload: bytes) -> str:
    with session_scope(settings.database_url) as s:
        tenant = s.scalar(select(Job.tenant_id).where(Job.id == job_id))
        rel = f"jobs/{job_id}/checkpoints/step-00000001"
        _write_adapter(Path(settings.artifacts_dir) / rel, payload)
        cid = new_id("ftckpt")
        s.add(Checkpoint(id=cid, job_id=job_id, tenant_id=tenant, step_number=1, metrics={"step": 1},
                         fine_tuned_model_checkpoint="ft:x:ckpt-step-1", adapter_path=rel))
    return cid


def test_guessed_ids_of_another_tenant_reach_nothing(client, alice, bob, settings):
    alice_job = _job(client, alice)
    # A synthetic succeeded job (_finish writes the worker's rows straight into the database, nothing
    # is trained): what is under test is who may reach those rows, not how a worker made them.
    alice_ckpts = _finish(settings, alice_job)
    bob_job = _job(client, bob)
    bob_ckpt = _own_checkpoint(settings, bob_job, b"bob's own adapter")
    with session_scope(settings.database_url) as s:
        alice_event = s.scalar(select(JobEvent.id).where(JobEvent.job_id == alice_job).limit(1))
    base = f"/v1/fine_tuning/jobs/{bob_job}"
    assert client.get(f"{base}/checkpoints/{bob_ckpt}/adapter", headers=bob.headers).status_code == 200
    # alice's checkpoint under bob's own job: the checkpoint does not exist for him
    for cid in alice_ckpts:
        assert_error(client.get(f"{base}/checkpoints/{cid}/adapter", headers=bob.headers), 404)
    # her ids as cursors are refused, they do not page into her data
    assert_error(client.get(f"{base}/checkpoints", headers=bob.headers, params={"after": alice_ckpts[0]}), 400,
                 "invalid_cursor", "after")
    assert_error(client.get(f"{base}/events", headers=bob.headers, params={"after": alice_event}), 400,
                 "invalid_cursor", "after")
    assert_error(client.get(f"{base}/events", headers={**bob.headers, "Last-Event-ID": alice_event},
                            params={"stream": "true"}), 400, "invalid_cursor")
    assert_error(client.get("/v1/fine_tuning/jobs", headers=bob.headers, params={"after": alice_job}), 400,
                 "invalid_cursor", "after")
    # his lists hold only his objects
    ckpts = client.get(f"{base}/checkpoints", headers=bob.headers).json()["data"]
    assert [c["id"] for c in ckpts] == [bob_ckpt]
    events = client.get(f"{base}/events", headers=bob.headers).json()["data"]
    assert events and all(alice_job not in e["message"] for e in events)
    assert [j["id"] for j in client.get("/v1/fine_tuning/jobs", headers=bob.headers).json()["data"]] == [bob_job]


def test_key_revoked_with_the_cli_is_refused_at_once(client, alice, settings):
    from service.keys import create_key

    second = create_key("alice")  # a second key of the same tenant keeps working
    assert client.get("/v1/files", headers=alice.headers).status_code == 200
    qlora = Path(sys.executable).with_name("qlora")
    env = {**os.environ, "QLORA_DATA_DIR": str(settings.data_dir)}
    out = subprocess.run([str(qlora), "keys", "revoke", alice.key], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "revoked 1 key" in out.stdout, out.stdout + out.stderr
    err = assert_error(client.get("/v1/files", headers=alice.headers), 401, "invalid_api_key")
    assert "revoked" in err["message"] and alice.key not in err["message"]
    assert client.get("/v1/files", headers={"Authorization": f"Bearer {second}"}).status_code == 200
