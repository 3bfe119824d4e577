"""The S3 store against a real S3 server process (moto's), and the same interface on local directories.

What a user would notice: a file put in is the file got back, byte for byte, on another host with
nothing on disk; a corrupted object or cached copy never reaches training; a directory is either
whole in the store or absent; the cache stays within its budget; a bad path never leaves its area.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import boto3
import pytest

from service.objectstore import TREE_MANIFEST, ChecksumMismatch, S3Storage, Storage, get_storage
from service.settings import Settings
from service.storage import ArtifactMissing, UnsafePath
from tests.faults.services import S3_CREDENTIALS


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in S3_CREDENTIALS.items():
        monkeypatch.setenv(k, v)


def _s3_settings(tmp: Path, server, bucket: str, **kw) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(data_dir=tmp, storage_url=f"s3://{bucket}/pre/fix", s3_endpoint_url=server.url, **kw)


def _client(server):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=server.url, region_name="us-east-1")


def _host(tmp_path: Path, name: str, server, bucket: str, **kw) -> S3Storage:  # type: ignore[no-untyped-def]
    """A storage as one host sees it: its own data dir, the shared bucket."""
    storage = get_storage(_s3_settings(tmp_path / name, server, bucket, **kw))
    assert isinstance(storage, S3Storage)
    return storage


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_settings_pick_the_store_and_put_the_cache_under_the_data_dir(tmp_path: Path, s3_server, s3_bucket) -> None:
    local = Settings(data_dir=tmp_path)
    assert not local.storage_is_s3 and local.files_dir == tmp_path / "files"
    assert type(get_storage(local)) is Storage
    elsewhere = Settings(data_dir=tmp_path, storage_url=f"file://{tmp_path / 'shared'}")
    assert elsewhere.artifacts_dir == tmp_path / "shared" / "artifacts" and not elsewhere.storage_is_s3
    s3 = _s3_settings(tmp_path, s3_server, s3_bucket)
    assert s3.storage_is_s3 and s3.models_dir == tmp_path / "cache" / "models"
    storage = get_storage(s3)
    assert storage.bucket == s3_bucket and storage.prefix == "pre/fix/"
    assert storage.key("files", "t/f.jsonl") == "pre/fix/files/t/f.jsonl"


def test_a_file_published_on_one_host_is_fetched_on_another_with_its_checksum(tmp_path: Path, s3_server,
                                                                              s3_bucket) -> None:
    a, b = _host(tmp_path, "a", s3_server, s3_bucket), _host(tmp_path, "b", s3_server, s3_bucket)
    data = os.urandom(3 * 1024 * 1024 + 17)
    _write(a.local_path("files", "t1/file-1.jsonl"), data)
    a.publish_file("files", "t1/file-1.jsonl")
    head = _client(s3_server).head_object(Bucket=s3_bucket, Key="pre/fix/files/t1/file-1.jsonl")
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert b.exists("files", "t1/file-1.jsonl") and b.size("files", "t1/file-1.jsonl") == len(data)
    assert b"".join(b.iter_bytes("files", "t1/file-1.jsonl")) == data  # streamed, no local copy
    assert not b.local_path("files", "t1/file-1.jsonl").exists()
    got = b.fetch_file("files", "t1/file-1.jsonl", sha256=hashlib.sha256(data).hexdigest())
    assert got.read_bytes() == data and got.is_relative_to(tmp_path / "b")
    with pytest.raises(ArtifactMissing):
        b.fetch_file("files", "t1/absent.jsonl")
    with pytest.raises(ArtifactMissing):
        b.iter_bytes("files", "t1/absent.jsonl")


def test_corrupt_bytes_never_reach_a_caller(tmp_path: Path, s3_server, s3_bucket) -> None:
    a, b = _host(tmp_path, "a", s3_server, s3_bucket), _host(tmp_path, "b", s3_server, s3_bucket)
    data = b'{"messages": []}\n' * 100
    sha = hashlib.sha256(data).hexdigest()
    _write(a.local_path("files", "t/f.jsonl"), data)
    a.publish_file("files", "t/f.jsonl")
    cached = b.fetch_file("files", "t/f.jsonl", sha256=sha)
    # A cached copy damaged on disk is noticed (its hash is checked against the row's) and fetched again.
    cached.write_bytes(data[:-5] + b"XXXXX")
    assert b.fetch_file("files", "t/f.jsonl", sha256=sha).read_bytes() == data
    # An object damaged in the store (bytes that no longer match their recorded sha256) is refused,
    # and nothing of it is left in the cache.
    _client(s3_server).put_object(Bucket=s3_bucket, Key="pre/fix/files/t/g.jsonl", Body=b"tampered",
                                  Metadata={"sha256": sha})
    with pytest.raises(ChecksumMismatch):
        b.fetch_file("files", "t/g.jsonl")
    assert not b.local_path("files", "t/g.jsonl").exists()
    assert not [p for p in b.local_path("files", "t").iterdir() if p.name.endswith(".part")]
    # The bytes match their metadata but not the dataset the row describes: refused too.
    b.drop_local("files", "t/f.jsonl")
    with pytest.raises(ChecksumMismatch):
        b.fetch_file("files", "t/f.jsonl", sha256="0" * 64)
    assert not b.local_path("files", "t/f.jsonl").exists()


def test_a_tree_is_whole_or_absent_and_a_republish_drops_stale_files(tmp_path: Path, s3_server, s3_bucket) -> None:
    a, b = _host(tmp_path, "a", s3_server, s3_bucket), _host(tmp_path, "b", s3_server, s3_bucket)
    ckpt = "jobs/j1/checkpoints/step-00000002"
    d = a.local_path("artifacts", ckpt)
    _write(d / "adapter_model.safetensors", os.urandom(4096))
    _write(d / "adapter_config.json", b"{}")
    _write(d / "sub" / "state.pt", os.urandom(100))
    _write(d / "COMPLETE", b"")
    s3 = _client(s3_server)
    # Files without their manifest are no tree: what a reader sees of an upload cut short.
    s3.put_object(Bucket=s3_bucket, Key=f"pre/fix/artifacts/{ckpt}/adapter_config.json", Body=b"{}")
    assert not b.tree_exists("artifacts", ckpt)
    with pytest.raises(ArtifactMissing):
        b.fetch_tree("artifacts", ckpt)
    a.publish_tree("artifacts", ckpt)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="pre/fix/artifacts/")["Contents"]]
    assert sorted(k.rsplit("/", 1)[-1] for k in keys) == sorted(
        ["COMPLETE", "adapter_config.json", "adapter_model.safetensors", "state.pt", TREE_MANIFEST])
    got = b.fetch_tree("artifacts", ckpt, cache=False)
    for name in ("adapter_model.safetensors", "adapter_config.json", "sub/state.pt", "COMPLETE"):
        assert (got / name).read_bytes() == (d / name).read_bytes(), name
    # Republished without a file: the store forgets it, and so does the next fetch.
    (d / "sub" / "state.pt").unlink()
    (d / "adapter_config.json").write_bytes(b'{"r": 8}')
    a.publish_tree("artifacts", ckpt)
    again = b.fetch_tree("artifacts", ckpt)
    assert not (again / "sub" / "state.pt").exists() and (again / "adapter_config.json").read_bytes() == b'{"r": 8}'
    manifest = json.loads((again / TREE_MANIFEST).read_text())
    assert set(manifest["files"]) == {"adapter_model.safetensors", "adapter_config.json", "COMPLETE"}
    # Deleting a tree with subdirectories as one adapter is refused; the whole job's tree is not one.
    with pytest.raises(UnsafePath):
        a.delete_tree("artifacts", "jobs/j1", flat=True)
    a.delete_tree("artifacts", ckpt, flat=True)
    assert not b.tree_exists("artifacts", ckpt) and not a.local_path("artifacts", ckpt).exists()


def test_a_cached_tree_refreshed_from_the_store_is_never_missing(tmp_path: Path, s3_server, s3_bucket,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader (the inference server, a resuming job) of a cached tree that another fetch refreshes
    finds the old copy or the new one, never no directory while the old copy is being deleted."""
    a, b = _host(tmp_path, "a", s3_server, s3_bucket), _host(tmp_path, "b", s3_server, s3_bucket)
    rel = "jobs/j1/adapter"
    d = a.local_path("artifacts", rel)
    _write(d / "adapter_model.safetensors", os.urandom(4096))
    a.publish_tree("artifacts", rel)
    cached = b.fetch_tree("artifacts", rel)
    _write(d / "adapter_model.safetensors", os.urandom(4096))
    a.publish_tree("artifacts", rel)
    seen_while_deleting: list[bool] = []
    rmtree = shutil.rmtree

    def watching_rmtree(path, *args, **kw):  # type: ignore[no-untyped-def]
        seen_while_deleting.append((cached / TREE_MANIFEST).is_file())
        return rmtree(path, *args, **kw)

    monkeypatch.setattr(shutil, "rmtree", watching_rmtree)
    assert b.fetch_tree("artifacts", rel) == cached
    assert seen_while_deleting and all(seen_while_deleting)
    assert (cached / "adapter_model.safetensors").read_bytes() == (d / "adapter_model.safetensors").read_bytes()
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name]


def test_paths_never_leave_their_area(tmp_path: Path, s3_server, s3_bucket) -> None:
    storage = _host(tmp_path, "a", s3_server, s3_bucket)
    for bad in ("../x", "a/../../x", "/etc/passwd", ""):
        with pytest.raises((UnsafePath, ValueError)):
            storage.key("files", bad)
        assert not storage.exists("files", bad)
    with pytest.raises(ValueError):
        storage.key("elsewhere", "x")
    for storage in (storage, get_storage(Settings(data_dir=tmp_path / "local"))):
        with pytest.raises(UnsafePath):
            storage.delete_tree("artifacts", ".")


def test_the_cache_keeps_the_most_recently_used_within_its_budget(tmp_path: Path, s3_server, s3_bucket) -> None:
    writer = _host(tmp_path, "w", s3_server, s3_bucket)
    for i in range(4):
        _write(writer.local_path("files", f"t/f{i}.jsonl"), bytes([i]) * 1000)
        writer.publish_file("files", f"t/f{i}.jsonl")
    reader = _host(tmp_path, "r", s3_server, s3_bucket, cache_max_bytes=2500)
    for i in (0, 1):
        reader.fetch_file("files", f"t/f{i}.jsonl")
    reader.fetch_file("files", "t/f0.jsonl")  # f0 used again: f1 is now the least recently used
    reader.fetch_file("files", "t/f2.jsonl")
    present = sorted(p.name for p in reader.local_path("files", "t").iterdir())
    assert present == ["f0.jsonl", "f2.jsonl"]
    # A model directory is an entry too, counted by its bytes.
    _write(writer.local_path("models", "org--m") / "model.safetensors", b"m" * 2000)
    _write(writer.local_path("models", "org--m") / "qlora_model.json", b"{}")
    writer.publish_tree("models", "org--m")
    assert writer.list_dirs("models") == ["org--m"] and reader.list_dirs("models") == ["org--m"]
    reader.fetch_tree("models", "org--m")
    assert not reader.local_path("files", "t/f0.jsonl").exists() and not reader.local_path("files", "t/f2.jsonl").exists()
    assert (reader.local_path("models", "org--m") / "model.safetensors").is_file()


def test_a_model_imported_on_one_host_is_listed_and_fetched_on_another(tmp_path: Path, s3_server, s3_bucket,
                                                                       tiny_model_dir: Path) -> None:
    from qlora_core.store import ModelStore

    a, b = _host(tmp_path, "a", s3_server, s3_bucket), _host(tmp_path, "b", s3_server, s3_bucket)
    ModelStore(a.dirs["models"], remote=a).import_model(tiny_model_dir, "test/tiny")
    store_b = ModelStore(b.dirs["models"], remote=b)
    assert [m["id"] for m in store_b.list_models(ensure_bundled=False)] == ["test/tiny"]
    assert store_b.has_model("test/tiny") and not (b.dirs["models"] / "test--tiny").exists()
    path = store_b.model_path("test/tiny")
    assert path == b.dirs["models"] / "test--tiny" and (path / "config.json").is_file()
    with pytest.raises(ValueError, match="already exists"):
        store_b.import_model(tiny_model_dir, "test/tiny")
    with pytest.raises(KeyError):
        store_b.model_path("test/absent")
