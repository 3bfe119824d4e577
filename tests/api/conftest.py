"""Fixtures for the API tests: a private data dir, a migrated SQLite database, two tenants' keys
and an in-process client.

Jobs are enqueued for real, into the embedded broker (kombu's `sqla+sqlite` transport under the
test's data dir): no worker consumes them here, and none is needed to test what the API records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.settings import Settings, get_settings


def chat_lines(n: int) -> list[str]:
    """`n` valid chat examples, one JSON object per line."""
    return [json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                     {"role": "assistant", "content": f"{i + i}"}]}) for i in range(n)]


def jsonl(n: int) -> bytes:
    return ("\n".join(chat_lines(n)) + "\n").encode()


@pytest.fixture()
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings for a fresh, private installation under tmp_path (database migrated)."""
    from service import queue
    from service.migrate import upgrade

    monkeypatch.setenv("QLORA_DATA_DIR", str(tmp_path / "data"))
    for var in ("QLORA_DATABASE_URL", "QLORA_BROKER_URL", "QLORA_ARTIFACTS_DIR", "QLORA_FILES_DIR",
                "QLORA_MODELS_DIR", "QLORA_MAX_UPLOAD_BYTES", "QLORA_RATE_LIMIT_PER_MINUTE",
                "QLORA_MAX_CONCURRENT_JOBS", "QLORA_INFERENCE_URL", "QLORA_INFERENCE_TIMEOUT_S"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    queue._cached_app.cache_clear()
    s = get_settings()
    s.ensure_dirs()
    upgrade(s.database_url)
    yield s
    get_settings.cache_clear()
    queue._cached_app.cache_clear()


@dataclass
class Tenant:
    name: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture()
def alice(settings: Settings) -> Tenant:
    from service.keys import create_key

    return Tenant("alice", create_key("alice"))


@pytest.fixture()
def bob(settings: Settings) -> Tenant:
    from service.keys import create_key

    return Tenant("bob", create_key("bob"))


@pytest.fixture()
def client(settings: Settings) -> Iterator[TestClient]:
    from api.main import create_app

    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture()
def server(settings: Settings, alice: Tenant) -> Iterator[str]:
    """The app under a live uvicorn on a free port, for the official `openai` SDK: its base URL."""
    from qlora_cli.probe import free_port

    port = free_port()
    env = {**os.environ, "QLORA_DATA_DIR": str(settings.data_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("uvicorn did not start")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def upload(client: TestClient, tenant: Tenant, content: bytes, filename: str = "train.jsonl",
           purpose: str = "fine-tune"):
    return client.post("/v1/files", headers=tenant.headers, files={"file": (filename, content)},
                       data={"purpose": purpose})


def traversal_targets(filename: str, bases: Iterable[Path]) -> set[Path]:
    """Where a store that joined the client's `filename` onto one of `bases` would have written it.

    `base / filename` is the classic mistake: each `..` climbs out of `base` and an absolute name
    replaces it. The spots are resolved the way the OS would open them; none need exist.
    """
    return {(Path(base) / filename).resolve() for base in bases}


def assert_error(resp, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The response is an OpenAI error envelope with this status (and code/param when given)."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err
