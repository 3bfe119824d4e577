"""`GET /metrics` (api/metrics.py): Prometheus text with the database's figures and HTTP latency by route;
a token when one is set, else loopback only."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from service.database import session_scope
from service.db import Job, Worker
from tests.api.conftest import assert_error, upload


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict, name: str, **labels: str) -> float:
    for sample in (x for f in families.values() for x in f.samples):
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    raise AssertionError(f"no {name} {labels}")


def test_jobs_workers_and_latency_show(client, alice, settings) -> None:
    from tests.api.conftest import jsonl

    fid = upload(client, alice, jsonl(12)).json()["id"]
    models = client.get("/v1/models", headers=alice.headers).json()["data"]
    job = client.post("/v1/fine_tuning/jobs", headers=alice.headers,
                      json={"model": models[0]["id"], "training_file": fid})
    assert job.status_code == 200, job.text
    t = int(time.time())
    with session_scope(settings.database_url) as s:
        s.execute(update(Job).where(Job.id == job.json()["id"])
                  .values(status="running", started_at=t - 10, trained_tokens=5000))
        s.add(Worker(id="w1@host", device="cuda:0 (H200)", device_memory_bytes=141 * 2**30, compute_dtype="bfloat16",
                     started_at=t - 60, last_seen_at=t, current_job=job.json()["id"], alive=True))
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fam = _families(r.text)
    assert _value(fam, "qlora_jobs", status="running") == 1 and _value(fam, "qlora_jobs", status="queued") == 0
    assert _value(fam, "qlora_queue_depth") == 0
    rate = _value(fam, "qlora_job_training_tokens_per_second", job=job.json()["id"])
    assert 400 <= rate <= 500  # 5000 tokens in ~10 s
    assert _value(fam, "qlora_worker_up", worker="w1@host", device="cuda:0 (H200)", compute_dtype="bfloat16") == 1
    assert _value(fam, "qlora_http_request_duration_seconds_count", route="/v1/fine_tuning/jobs", method="POST",
                  status="200") == 1
    assert _value(fam, "qlora_http_request_duration_seconds_count", route="/v1/files", method="POST",
                  status="200") == 1
    with session_scope(settings.database_url) as s:
        s.execute(update(Job).values(status="succeeded", finished_at=t + 100))
    fam = _families(client.get("/metrics").text)
    assert _value(fam, "qlora_job_duration_seconds_count") == 1
    assert _value(fam, "qlora_job_duration_seconds_bucket", le="300.0") == 1
    assert _value(fam, "qlora_job_duration_seconds_bucket", le="60.0") == 0


def test_token_when_set_else_loopback_only(client, settings, monkeypatch) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app

    assert client.get("/metrics").status_code == 200  # the test client counts as local
    with TestClient(create_app(settings), client=("10.0.0.7", 50000)) as remote:
        assert_error(remote.get("/metrics"), 403, "metrics_forbidden")
        monkeypatch.setattr(settings, "metrics_token", "s3cret")
        assert_error(remote.get("/metrics"), 401, "invalid_metrics_token")
        assert_error(remote.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401)
        assert remote.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
