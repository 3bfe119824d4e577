"""Auth, rate limit and the error envelope on every kind of failure (api/deps.py, api/errors.py)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api.main import create_app
from service.keys import revoke_key
from tests.api.conftest import assert_error


def test_missing_malformed_unknown_and_revoked_keys_are_401(client, alice):
    assert_error(client.get("/v1/files"), 401, "invalid_api_key")
    assert_error(client.get("/v1/files", headers={"Authorization": "Basic abc"}), 401, "invalid_api_key")
    assert_error(client.get("/v1/files", headers={"Authorization": "Bearer sk-qlora-" + "x" * 43}), 401, "invalid_api_key")
    assert client.get("/v1/files", headers=alice.headers).status_code == 200
    assert revoke_key(alice.key) == 1
    err = assert_error(client.get("/v1/files", headers=alice.headers), 401, "invalid_api_key")
    assert alice.key not in err["message"]


def test_unknown_route_405_and_validation_errors_use_the_envelope(client, alice):
    assert_error(client.get("/v1/nothing-here", headers=alice.headers), 404, "unknown_url")
    assert_error(client.put("/v1/files", headers=alice.headers), 405, "method_not_allowed")
    assert_error(client.get("/v1/fine_tuning/jobs", headers=alice.headers, params={"limit": "many"}), 400, param="limit")
    err = assert_error(client.post("/v1/fine_tuning/jobs", headers={**alice.headers, "content-type": "application/json"},
                                   content=b"{not json"), 400)
    assert err["type"] == "invalid_request_error"


def test_rate_limit_is_429_per_key(settings, alice, bob):
    settings.rate_limit_per_minute = 3
    with TestClient(create_app(settings)) as c:
        for _ in range(3):
            assert c.get("/v1/files", headers=alice.headers).status_code == 200
        resp = c.get("/v1/files", headers=alice.headers)
        assert_error(resp, 429, "rate_limit_exceeded")
        assert int(resp.headers["retry-after"]) >= 1
        assert c.get("/v1/files", headers=bob.headers).status_code == 200  # another key has its own window


def test_database_unavailable_is_503(settings, alice, tmp_path):
    settings.database_url = f"sqlite:///{tmp_path}/no/such/dir/qlora.db"  # sqlite cannot open it
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        assert_error(c.get("/v1/files", headers=alice.headers), 503, "database_unavailable")
        assert c.get("/healthz").status_code == 200
        resp = c.get("/readyz")
        assert resp.status_code == 503 and resp.json()["checks"]["database"] == "unreachable"


def test_ready_when_database_and_broker_answer(client):
    resp = client.get("/readyz")
    assert resp.status_code == 200, resp.text
    assert resp.json()["checks"] == {"database": "ok", "broker": "ok"}
    assert client.get("/docs").status_code == 200
    assert "/v1/fine_tuning/jobs" in client.get("/openapi.json").json()["paths"]
