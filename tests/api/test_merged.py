"""`GET /v1/fine_tuning/jobs/{id}/merged`: who may ask, when a build is requested, and what is served.

No worker runs here: build messages go for real into the embedded broker and are counted on the
way (`queue.enqueue_export` wrapped), a worker's outcome is written into the job row as
worker/export.py writes it, and the archive is a marker file where the worker would leave one.
The real build is tested in tests/worker/test_export.py and end to end in tests/e2e.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import select, update

from api.routes import job_outputs
from service import queue
from service.database import session_scope
from service.db import Job
from tests.api.conftest import assert_error
from tests.api.test_job_outputs import _finish, job_id  # noqa: F401 (the fixture)


@pytest.fixture()
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The job ids of the build messages sent (each really sent to the embedded broker too)."""
    ids: list[str] = []
    real = queue.enqueue_export

    def record(jid: str) -> None:
        real(jid)
        ids.append(jid)

    monkeypatch.setattr(queue, "enqueue_export", record)
    return ids


def _get(client, tenant, jid: str):
    return client.get(f"/v1/fine_tuning/jobs/{jid}/merged", headers=tenant.headers)


def _state(settings, jid: str) -> dict | None:
    with session_scope(settings.database_url) as s:
        return s.scalar(select(Job.merged_export).where(Job.id == jid))


def _set_state(settings, jid: str, **changes) -> None:
    """Change the job's merged_export as a worker (or time passing) would."""
    state = {**(_state(settings, jid) or {}), **changes}
    with session_scope(settings.database_url) as s:
        s.execute(update(Job).where(Job.id == jid).values(merged_export=state))


def _archive(settings, jid: str) -> Path:
    return Path(settings.artifacts_dir) / "jobs" / jid / "merged.tar.gz"


def _assert_building(resp, jid: str) -> None:
    assert resp.status_code == 202, resp.text
    assert int(resp.headers["retry-after"]) == job_outputs.MERGE_POLL_S
    body = resp.json()
    assert body["object"] == "fine_tuning.job.merged_export" and body["status"] == "building"
    assert body["fine_tuning_job_id"] == jid and body["retry_after"] == job_outputs.MERGE_POLL_S


def test_another_tenants_job_is_not_found(client, alice, bob, settings, job_id, sent):  # noqa: F811
    _finish(settings, job_id)
    assert_error(_get(client, bob, job_id), 404, "fine-tuning_job_not_found")
    assert_error(_get(client, alice, "ftjob-nope"), 404)
    assert sent == [] and _state(settings, job_id) is None


def test_a_job_that_has_not_succeeded_is_a_400(client, alice, settings, job_id, sent):  # noqa: F811
    err = assert_error(_get(client, alice, job_id), 400, "job_not_succeeded", "fine_tuning_job_id")
    assert "validating_files" in err["message"]
    assert sent == []


def test_building_once_then_the_archive(client, alice, settings, job_id, sent):  # noqa: F811
    """The first poll sends one build message; the next polls only answer 202; the archive is then served."""
    _finish(settings, job_id)
    for _ in range(3):
        _assert_building(_get(client, alice, job_id), job_id)
    assert sent == [job_id]
    assert _state(settings, job_id)["status"] == "building"

    _archive(settings, job_id).write_bytes(b"merged model archive")  # what the worker leaves
    resp = _get(client, alice, job_id)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/gzip"
    assert resp.content == b"merged model archive"
    assert f'filename="{job_id}-merged.tar.gz"' in resp.headers["content-disposition"]
    assert sent == [job_id]


def test_a_deleted_model_is_gone_with_its_merged_archive(client, alice, settings, job_id, sent):  # noqa: F811
    _finish(settings, job_id)
    _assert_building(_get(client, alice, job_id), job_id)
    _archive(settings, job_id).write_bytes(b"merged")
    ft = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=alice.headers).json()["fine_tuned_model"]
    assert client.delete(f"/v1/models/{ft}", headers=alice.headers).status_code == 200
    assert not _archive(settings, job_id).exists() and _state(settings, job_id) is None
    assert_error(_get(client, alice, job_id), 410, "model_deleted")
    assert sent == [job_id]


def test_a_failed_build_is_reported_then_retried(client, alice, settings, job_id, sent):  # noqa: F811
    """A failed build answers 500 `merge_failed` naming the failure until its retry is due, then builds again."""
    _finish(settings, job_id)
    _get(client, alice, job_id)
    t = int(time.time())
    error = {"code": "model_not_found", "message": "The base model x is no longer in the model store."}
    _set_state(settings, job_id, status="failed", error=error, finished_at=t)
    err = assert_error(_get(client, alice, job_id), 500, "merge_failed")
    assert err["type"] == "server_error" and "model_not_found" in err["message"] and "no longer" in err["message"]
    resp = _get(client, alice, job_id)
    assert 0 < int(resp.headers["retry-after"]) <= job_outputs.MERGE_RETRY_S
    assert sent == [job_id]

    _set_state(settings, job_id, finished_at=t - job_outputs.MERGE_RETRY_S)  # the retry is due
    _assert_building(_get(client, alice, job_id), job_id)
    assert sent == [job_id, job_id]
    state = _state(settings, job_id)
    assert state["status"] == "building" and state["attempts"] == 2 and state["error"] is None

    # a second failure waits twice as long
    _set_state(settings, job_id, status="failed", error=error, finished_at=t - job_outputs.MERGE_RETRY_S)
    assert_error(_get(client, alice, job_id), 500, "merge_failed")
    assert sent == [job_id, job_id]


def test_a_request_unanswered_for_long_is_sent_again(client, alice, settings, job_id, sent):  # noqa: F811
    _finish(settings, job_id)
    _get(client, alice, job_id)
    _set_state(settings, job_id, requested_at=int(time.time()) - job_outputs.MERGE_STALE_S)
    _assert_building(_get(client, alice, job_id), job_id)
    _assert_building(_get(client, alice, job_id), job_id)
    assert sent == [job_id, job_id]


def test_a_broker_outage_is_retried_by_the_next_poll(client, alice, settings, job_id, monkeypatch):  # noqa: F811
    _finish(settings, job_id)
    calls: list[str] = []

    def down(jid: str) -> None:
        calls.append(jid)
        raise BrokerError("broker down")

    monkeypatch.setattr(queue, "enqueue_export", down)
    _assert_building(_get(client, alice, job_id), job_id)
    _assert_building(_get(client, alice, job_id), job_id)
    assert calls == [job_id, job_id]  # nothing recorded as sent, so each poll tries again


def test_missing_adapter_files_are_a_410(client, alice, settings, job_id, sent):  # noqa: F811
    _finish(settings, job_id)
    (Path(settings.artifacts_dir) / "jobs" / job_id / "adapter" / "adapter_config.json").unlink()
    assert_error(_get(client, alice, job_id), 410, "artifact_missing")
    assert sent == []
