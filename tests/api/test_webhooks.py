"""`/v1/webhooks` (api/routes/webhooks.py): register, list, delete, per tenant; URLs checked."""

from __future__ import annotations

from tests.api.conftest import assert_error

PUBLIC = "https://93.184.215.14/hooks"  # an https URL on a public address (no DNS needed)


def test_register_list_delete(client, alice) -> None:
    r = client.post("/v1/webhooks", headers=alice.headers, json={"url": PUBLIC})
    assert r.status_code == 200, r.text
    ep = r.json()
    assert ep["object"] == "webhook_endpoint" and ep["url"] == PUBLIC and ep["secret"].startswith("whsec_")
    assert ep["events"] == ["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]
    listed = client.get("/v1/webhooks", headers=alice.headers).json()["data"]
    assert [w["id"] for w in listed] == [ep["id"]] and listed[0]["secret"] is None  # shown only once
    gone = client.delete(f"/v1/webhooks/{ep['id']}", headers=alice.headers)
    assert gone.json() == {"id": ep["id"], "object": "webhook_endpoint", "deleted": True}
    assert client.get("/v1/webhooks", headers=alice.headers).json()["data"] == []
    assert_error(client.delete(f"/v1/webhooks/{ep['id']}", headers=alice.headers), 404)


def test_only_the_tenants_own(client, alice, bob) -> None:
    ep = client.post("/v1/webhooks", headers=alice.headers, json={"url": PUBLIC}).json()
    assert client.get("/v1/webhooks", headers=bob.headers).json()["data"] == []
    assert_error(client.delete(f"/v1/webhooks/{ep['id']}", headers=bob.headers), 404)
    assert len(client.get("/v1/webhooks", headers=alice.headers).json()["data"]) == 1


def test_bad_urls_and_events_are_400s_naming_the_param(client, alice) -> None:
    for url in ("http://93.184.215.14/x", "https://127.0.0.1/x", "https://192.168.1.5/x", "not a url",
                "https://u:p@93.184.215.14/x"):
        err = assert_error(client.post("/v1/webhooks", headers=alice.headers, json={"url": url}), 400, "invalid_url")
        assert err["param"] == "url"
    err = assert_error(client.post("/v1/webhooks", headers=alice.headers,
                                   json={"url": PUBLIC, "events": ["fine_tuning.job.started"]}), 400, "invalid_value")
    assert err["param"] == "events" and "fine_tuning.job.started" in err["message"]
    assert_error(client.post("/v1/webhooks", headers=alice.headers, json={"url": PUBLIC, "secret": "x"}), 400)
    assert client.get("/v1/webhooks", headers=alice.headers).json()["data"] == []


def test_loopback_http_allowed_when_insecure_is_set(client, alice, settings, monkeypatch) -> None:
    monkeypatch.setattr(settings, "webhook_allow_insecure", True)
    r = client.post("/v1/webhooks", headers=alice.headers,
                    json={"url": "http://127.0.0.1:9000/hooks", "events": ["fine_tuning.job.failed"]})
    assert r.status_code == 200 and r.json()["events"] == ["fine_tuning.job.failed"]


def test_needs_a_key(client) -> None:
    assert_error(client.get("/v1/webhooks"), 401)
