"""The API with `QLORA_STORAGE_URL=s3://...` (moto's S3 server process): what it stores goes to the
bucket, what it serves streams from there, and it keeps nothing on its own disk.

The whole path through real workers on separate hosts is tests/faults/test_multi_host.py; here the
API alone, with a synthetic succeeded job whose artifacts are published as a worker publishes them.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import boto3
import pytest

from qlora_core.store import BUNDLED_MODEL_ID, ModelStore
from service.objectstore import get_storage, model_remote
from service.settings import Settings, get_settings
from tests.api.conftest import assert_error, jsonl, upload
from tests.api.test_job_outputs import _finish


@pytest.fixture()
def settings(settings: Settings, s3_server, s3_bucket, monkeypatch: pytest.MonkeyPatch) -> Settings:  # type: ignore[no-untyped-def]
    """The API tests' installation, with its store in a fresh bucket."""
    for k, v in s3_server.storage_env(s3_bucket, "api").items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    s = get_settings()
    s.ensure_dirs()
    assert s.storage_is_s3
    return s


def _objects(settings: Settings, prefix: str = "") -> dict[str, dict]:
    s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url)
    bucket = settings.storage_url.split("/")[2]
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"api/{prefix}")
    return {o["Key"][len("api/"):]: o for page in pages for o in page.get("Contents", [])}


def _local_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_an_upload_lives_in_the_bucket_and_streams_back(client, alice, settings) -> None:
    data = jsonl(12)
    resp = upload(client, alice, data)
    assert resp.status_code == 200, resp.text
    fid = resp.json()["id"]
    objects = _objects(settings, "files/")
    assert len(objects) == 1 and next(iter(objects)).endswith(f"/{fid}.jsonl")
    assert next(iter(objects.values()))["Size"] == len(data)
    assert _local_files(Path(settings.files_dir)) == []  # the API keeps no copy
    got = client.get(f"/v1/files/{fid}/content", headers=alice.headers)
    assert got.status_code == 200 and got.content == data and got.headers["content-length"] == str(len(data))
    # A refused upload leaves nothing behind, in the bucket or on disk.
    assert_error(upload(client, alice, b'{"messages": 1}\n'), 400, "invalid_file_format")
    assert len(_objects(settings, "files/")) == 1 and _local_files(Path(settings.files_dir)) == []
    assert client.delete(f"/v1/files/{fid}", headers=alice.headers).status_code == 200
    assert _objects(settings, "files/") == {}


def test_a_file_gone_from_the_bucket_is_410_not_500(client, alice, settings) -> None:
    fid = upload(client, alice, jsonl(10)).json()["id"]
    key = next(iter(_objects(settings, "files/")))
    boto3.client("s3", endpoint_url=settings.s3_endpoint_url).delete_object(
        Bucket=settings.storage_url.split("/")[2], Key=f"api/{key}")
    assert_error(client.get(f"/v1/files/{fid}/content", headers=alice.headers), 410, "file_content_missing")


def test_models_in_the_bucket_are_listed_and_accepted(client, alice, settings, tiny_model_dir) -> None:
    other_host = Settings(data_dir=Path(settings.data_dir) / "other-host", storage_url=settings.storage_url,
                          s3_endpoint_url=settings.s3_endpoint_url)  # `qlora models import` run elsewhere
    ModelStore(other_host.models_dir, remote=model_remote(other_host)).import_model(tiny_model_dir, "test/tiny")
    ids = [m["id"] for m in client.get("/v1/models", headers=alice.headers).json()["data"]]
    assert "test/tiny" in ids and BUNDLED_MODEL_ID in ids
    assert not (Path(settings.models_dir) / "test--tiny").exists()  # listed from the bucket, not fetched
    fid = upload(client, alice, jsonl(10)).json()["id"]
    resp = client.post("/v1/fine_tuning/jobs/estimate", headers=alice.headers,
                       json={"model": "test/tiny", "training_file": fid})
    assert resp.status_code == 200, resp.text  # the memory estimate read config.json from the bucket
    assert_error(client.post("/v1/fine_tuning/jobs", headers=alice.headers,
                             json={"model": "test/absent", "training_file": fid}), 400, "model_not_found")


def _publish_like_a_worker(settings: Settings, job_id: str) -> None:
    storage = get_storage(settings)
    for d in sorted((Path(settings.artifacts_dir) / "jobs" / job_id).rglob("adapter_config.json")):
        storage.publish_tree("artifacts", storage.rel_of("artifacts", d.parent))
    storage.drop_local("artifacts", f"jobs/{job_id}")


def test_adapters_are_served_from_the_bucket_and_deleted_from_it(client, alice, settings) -> None:
    fid = upload(client, alice, jsonl(10)).json()["id"]
    job_id = client.post("/v1/fine_tuning/jobs", headers=alice.headers,
                         json={"model": BUNDLED_MODEL_ID, "training_file": fid}).json()["id"]
    ckpts = _finish(settings, job_id)
    _publish_like_a_worker(settings, job_id)
    assert not (Path(settings.artifacts_dir) / "jobs" / job_id).exists()

    resp = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", headers=alice.headers)
    assert resp.status_code == 200, resp.text
    with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["adapter_config.json", "adapter_model.safetensors"]  # no state.pt
        assert tar.extractfile("adapter_model.safetensors").read() == b"final"
    resp = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{ckpts[0]}/adapter", headers=alice.headers)
    with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:gz") as tar:
        assert tar.extractfile("adapter_model.safetensors").read() == b"ckpt2"
    # Built once from the bucket's copy, kept there; the API's disk stays empty.
    keys = _objects(settings, "artifacts/")
    assert f"artifacts/jobs/{job_id}/adapter.tar.gz" in keys and f"artifacts/downloads/{job_id}/{ckpts[0]}.tar.gz" in keys
    assert _local_files(Path(settings.artifacts_dir)) == []
    # The results CSV is a file in the bucket like an upload.
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=alice.headers).json()
    csv = client.get(f"/v1/files/{job['result_files'][0]}/content", headers=alice.headers)
    assert csv.status_code == 200 and csv.text.startswith("step,train_loss")

    assert client.delete(f"/v1/models/{job['fine_tuned_model']}", headers=alice.headers).status_code == 200
    left = set(_objects(settings, f"artifacts/jobs/{job_id}/"))
    gone = [k for k in left if k.split(job_id, 1)[1].startswith(("/adapter/", "/adapter.tar.gz"))]
    assert gone == []  # the adapter and its archive
    assert [k for k in left if "/checkpoints/" in k]  # the checkpoints keep theirs (as on disk)
    assert_error(client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", headers=alice.headers), 410, "model_deleted")


def test_the_store_checksum_is_the_uploads_sha256(client, alice, settings) -> None:
    data = jsonl(11)
    fid = upload(client, alice, data).json()["id"]
    key = next(iter(_objects(settings, "files/")))
    head = boto3.client("s3", endpoint_url=settings.s3_endpoint_url).head_object(
        Bucket=settings.storage_url.split("/")[2], Key=f"api/{key}")
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads(client.get(f"/v1/files/{fid}", headers=alice.headers).text)["bytes"] == len(data)
