"""PostgreSQL goes away under a live API: 503 `database_unavailable` while it is gone, then recovery.

A private PostgreSQL (tests/faults/services.py) backs a real uvicorn process. While the database
is stopped (cleanly) or killed (a crash), every endpoint that needs it answers 503 in OpenAI's
error envelope with a `Retry-After`, `/readyz` answers 503 naming the database, and `/healthz`
stays 200. When the database is back the *same* API process serves again by itself: the engine's
pool pre-ping drops dead connections, so no restart is needed.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from service.keys import create_key
from service.migrate import upgrade
from tests.api.conftest import assert_error, jsonl
from tests.faults.services import ServerProcess, start_api_server

RECOVERY_WAIT_S = 60.0


@pytest.fixture()
def api(private_postgres: ServerProcess, tmp_path: Path):
    upgrade(private_postgres.url)
    server = start_api_server({"QLORA_DATA_DIR": str(tmp_path / "data"), "QLORA_DATABASE_URL": private_postgres.url})
    try:
        yield server
    finally:
        server.close()


def _get_files(base: str, key: str) -> httpx.Response:
    return httpx.get(f"{base}/v1/files", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _wait_until_served(base: str, key: str) -> httpx.Response:
    deadline = time.monotonic() + RECOVERY_WAIT_S
    while True:
        resp = _get_files(base, key)
        if resp.status_code != 503 or time.monotonic() > deadline:
            return resp
        time.sleep(0.5)


def _assert_unavailable(base: str, key: str, files_dir: Path) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    err = assert_error(_get_files(base, key), 503, "database_unavailable")
    assert err["type"] == "server_error" and "database is unavailable" in err["message"]
    up = httpx.post(f"{base}/v1/files", headers=auth, files={"file": ("t.jsonl", jsonl(10))},
                    data={"purpose": "fine-tune"}, timeout=30)
    assert_error(up, 503, "database_unavailable")
    assert int(up.headers["retry-after"]) >= 1
    job = httpx.post(f"{base}/v1/fine_tuning/jobs", headers=auth, json={"model": "m", "training_file": "file-x"},
                     timeout=30)
    assert_error(job, 503, "database_unavailable")
    ready = httpx.get(f"{base}/readyz", timeout=30)
    assert ready.status_code == 503 and ready.json()["checks"]["database"] == "unreachable"
    assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
    # Nothing half-written: no upload reached the file store while the database was away.
    assert not [p for p in files_dir.rglob("*") if p.is_file()]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_api_answers_503_while_postgres_is_down_and_recovers_alone(api, private_postgres, tmp_path, how):
    key = create_key("acme", database_url=private_postgres.url)
    auth = {"Authorization": f"Bearer {key}"}
    files_dir = tmp_path / "data" / "files"
    assert _get_files(api.url, key).status_code == 200
    assert httpx.get(f"{api.url}/readyz", timeout=30).status_code == 200
    pid = api.proc.pid

    getattr(private_postgres, how)()
    _assert_unavailable(api.url, key, files_dir)

    private_postgres.start()
    resp = _wait_until_served(api.url, key)
    assert resp.status_code == 200, resp.text
    assert api.proc.pid == pid and api.running  # the same process recovered, nothing restarted it
    assert httpx.get(f"{api.url}/readyz", timeout=30).status_code == 200
    up = httpx.post(f"{api.url}/v1/files", headers=auth, files={"file": ("t.jsonl", jsonl(10))},
                    data={"purpose": "fine-tune"}, timeout=30)
    assert up.status_code == 200, up.text
    assert [f["id"] for f in _get_files(api.url, key).json()["data"]] == [up.json()["id"]]
