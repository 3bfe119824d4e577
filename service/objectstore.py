"""Where datasets, base models and artifacts live: local directories, or an S3 bucket and a local cache.

`QLORA_STORAGE_URL` picks the store (CONTRACT). Everything the service keeps lies in three areas:
`files` (uploads and results CSVs, at the relative path `files.storage_path` records), `artifacts`
(checkpoints, adapters and archives, as the job and checkpoint rows record them) and `models` (one
directory per base model, qlora_core.store). Processes always read and write these under their own
local directories (`settings.files_dir`, `artifacts_dir`, `models_dir`); a `Storage` moves them
between those directories and the store:

- `LocalStorage`: the local directories are the store. Publishing and fetching do nothing, and every
  process must see one filesystem (the embedded mode, or a shared mount).
- `S3Storage`: the bucket is the store, each file at `<prefix><area>/<rel>`, and the local directories
  are this host's cache. Workers publish each checkpoint as it completes (before its row is written,
  so a row always names something in the store), and a job taken over on another host fetches its
  last recorded checkpoint and goes on from there. Base models and datasets fetched into the cache
  are checksummed and kept, least recently used first out, within `QLORA_CACHE_MAX_BYTES`.

Why boto3: it is AWS's own client, kept in step with S3 and with every S3-compatible server (MinIO,
Ceph, R2, moto), it streams multipart uploads from a file and downloads from a response body without
holding either in memory, and it is one dependency (s3fs brings aiobotocore, which pins botocore
to a narrow range and lags boto3's releases).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from service.settings import Settings
from service.storage import ArtifactMissing, UnsafePath, resolve_under

log = logging.getLogger(__name__)

TREE_MANIFEST = ".qlora-tree.json"
CHUNK = 1024 * 1024


class StorageError(RuntimeError):
    """The store could not be reached or refused an operation (the message says which)."""


class ChecksumMismatch(StorageError):
    """A fetched file's bytes do not hash to what was stored with it; nothing of it is kept."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _tree_files(directory: Path) -> list[Path]:
    """Every file under `directory`, in a stable order, without hidden temp files or the manifest."""
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.name != TREE_MANIFEST and not p.name.endswith(".part"))


class Storage:
    """The local store: the area directories hold everything (see the module docstring)."""

    remote = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dirs = {"files": Path(settings.files_dir), "artifacts": Path(settings.artifacts_dir),
                     "models": Path(settings.models_dir)}

    def describe(self) -> str:
        return f"local directories under {Path(self.settings.artifacts_dir).parent}"

    def local_path(self, area: str, rel: str) -> Path:
        """Where `rel` of `area` lives on this host (raises UnsafePath for a path leaving its area)."""
        if area not in self.dirs:
            raise ValueError(f"unknown storage area {area!r}")
        return resolve_under(self.dirs[area], rel)

    def rel_of(self, area: str, path: Path) -> str:
        """The relative path of a local `path` inside `area` (raises UnsafePath outside it)."""
        root = self.dirs[area].resolve()
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(root):
            raise UnsafePath(f"{str(path)!r} is outside {root}")
        return resolved.relative_to(root).as_posix()

    # -- publishing: the local copy becomes the store's --------------------------------------------
    def publish_file(self, area: str, rel: str) -> None:
        """Upload the local file `rel` of `area` to the store (nothing to do here)."""

    def publish_tree(self, area: str, rel: str) -> None:
        """Upload the local directory `rel` of `area`, its manifest last (nothing to do here)."""

    # -- fetching: a local copy of what the store holds ----------------------------------------
    def fetch_file(self, area: str, rel: str, sha256: str | None = None, cache: bool = True) -> Path:
        """A local path holding the file `rel` of `area`.

        Raises:
            ArtifactMissing: the store has no such file.
            ChecksumMismatch: (S3) the bytes fetched do not match their checksum.
        """
        path = self.local_path(area, rel)
        if not path.is_file():
            raise ArtifactMissing(f"{area}/{rel} is missing")
        return path

    def fetch_tree(self, area: str, rel: str, cache: bool = True) -> Path:
        """A local directory holding the directory `rel` of `area` (raises ArtifactMissing)."""
        path = self.local_path(area, rel)
        if not path.is_dir():
            raise ArtifactMissing(f"{area}/{rel} is missing")
        return path

    # -- reading without a local copy -----------------------------------------------------------
    def exists(self, area: str, rel: str) -> bool:
        try:
            return self.local_path(area, rel).is_file()
        except UnsafePath:
            return False

    def tree_exists(self, area: str, rel: str) -> bool:
        try:
            return self.local_path(area, rel).is_dir()
        except UnsafePath:
            return False

    def size(self, area: str, rel: str) -> int:
        """The stored file's size in bytes (raises ArtifactMissing)."""
        return self.fetch_file(area, rel).stat().st_size

    def iter_bytes(self, area: str, rel: str) -> Iterator[bytes]:
        """The stored file's bytes in chunks (raises ArtifactMissing before the first one)."""
        path = self.fetch_file(area, rel)
        fh = open(path, "rb")

        def chunks() -> Iterator[bytes]:
            with fh:
                yield from iter(lambda: fh.read(CHUNK), b"")

        return chunks()

    def read_bytes(self, area: str, rel: str) -> bytes:
        """A small stored file whole (a manifest, a config); raises ArtifactMissing."""
        return self.fetch_file(area, rel).read_bytes()

    def list_dirs(self, area: str) -> list[str]:
        """The names of the top-level directories of `area` (models: one per base model)."""
        root = self.dirs[area]
        return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) if root.is_dir() else []

    # -- deleting ----------------------------------------------------------------------------------
    def delete(self, area: str, rel: str) -> None:
        """Remove a stored file; a missing one is not an error."""
        self.local_path(area, rel).unlink(missing_ok=True)

    def delete_tree(self, area: str, rel: str, flat: bool = False) -> None:
        """Remove a stored directory and everything in it; a missing one is not an error.

        Raises:
            UnsafePath: `rel` is the whole area, or `flat` is set and the directory holds subdirectories.
        """
        path = self.local_path(area, rel)
        if path == self.dirs[area].resolve():
            raise UnsafePath(f"refusing to delete the whole {area} area")
        if flat and path.is_dir() and any(c.is_dir() for c in path.iterdir()):
            raise UnsafePath(f"refusing to delete {area}/{rel}: it holds subdirectories")
        shutil.rmtree(path, ignore_errors=True)

    def drop_local(self, area: str, rel: str) -> None:
        """Forget this host's copy of something the store keeps (here the copy is the store: keep it)."""


class S3Storage(Storage):
    """An S3 bucket (AWS, MinIO, moto's server, ...) behind `s3://BUCKET/PREFIX`, with a local cache.

    See Note: store checksums and Note: trees in the store.
    """

    remote = True

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        parsed = urlparse(settings.storage_url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"QLORA_STORAGE_URL must look like s3://BUCKET/PREFIX, got {settings.storage_url!r}")
        self.bucket = parsed.netloc
        prefix = parsed.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = settings.s3_endpoint_url or None
        self.cache = LocalCache(Path(settings.data_dir) / "cache", settings.cache_max_bytes, self)
        self._client: Any = None
        self._client_pid = -1
        self._lock = threading.Lock()

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}, cache in {Path(self.settings.data_dir) / 'cache'}"

    @property
    def client(self) -> Any:
        # One client per process: boto3 clients are thread-safe, but not to be shared across fork().
        with self._lock:
            if self._client is None or self._client_pid != os.getpid():
                import boto3
                from botocore.config import Config

                config = Config(retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=10, read_timeout=120,
                                s3={"addressing_style": "path"} if self.endpoint_url else {})
                self._client = boto3.client("s3", endpoint_url=self.endpoint_url, config=config)
                self._client_pid = os.getpid()
            return self._client

    def key(self, area: str, rel: str) -> str:
        self.local_path(area, rel)  # the same containment rules as on disk (and a known area)
        parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise UnsafePath(f"not a stored path: {rel!r}")
        return f"{self.prefix}{area}/{'/'.join(parts)}"

    # -- low-level -------------------------------------------------------------------------------
    def _missing(self, e: Exception) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")

    def _put(self, path: Path, key: str, sha: str | None = None) -> None:
        from boto3.s3.transfer import TransferConfig

        sha = sha or sha256_of(path)
        # upload_file streams from disk, in parts of 16 MiB past 64 MiB: a large upload is never in memory.
        self.client.upload_file(str(path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": sha}},
                                Config=TransferConfig(multipart_threshold=64 * CHUNK, multipart_chunksize=16 * CHUNK))

    def _get(self, key: str, dest: Path, expect_sha: str | None = None) -> str:
        """Download `key` to `dest` through a temp file, checking its sha256; returns the sha256."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            if self._missing(e):
                raise ArtifactMissing(f"s3://{self.bucket}/{key} is missing") from None
            raise
        stored = (response.get("Metadata") or {}).get("sha256")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as fh:
                for chunk in response["Body"].iter_chunks(CHUNK):
                    fh.write(chunk)
                    h.update(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            got = h.hexdigest()
            for want in (expect_sha, stored):  # See Note: store checksums
                if want and want != got:
                    raise ChecksumMismatch(f"s3://{self.bucket}/{key}: sha256 {got} does not match the stored {want}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return got

    def _list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys

    def _delete_keys(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i:i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    # -- publishing ------------------------------------------------------------------------------
    def publish_file(self, area: str, rel: str) -> None:
        path = self.local_path(area, rel)
        self._put(path, self.key(area, rel))

    def publish_tree(self, area: str, rel: str) -> None:
        # Note: trees in the store. A directory (a checkpoint, an adapter, a model) is its files plus
        # a manifest listing each one's size and sha256, uploaded last: a reader that finds the
        # manifest finds every file it names, and one that does not sees no tree. Files of an
        # earlier upload of the same tree that the new one lacks are removed after the manifest.
        directory = self.local_path(area, rel)
        if not directory.is_dir():
            raise ArtifactMissing(f"{area}/{rel} is not a directory on this host")
        base = self.key(area, rel)
        files = {}
        for path in _tree_files(directory):
            name = path.relative_to(directory).as_posix()
            sha = sha256_of(path)
            self._put(path, f"{base}/{name}", sha)
            files[name] = {"bytes": path.stat().st_size, "sha256": sha}
        manifest = json.dumps({"files": files}, sort_keys=True).encode()
        self.client.put_object(Bucket=self.bucket, Key=f"{base}/{TREE_MANIFEST}", Body=manifest,
                               Metadata={"sha256": hashlib.sha256(manifest).hexdigest()})
        wanted = {f"{base}/{n}" for n in files} | {f"{base}/{TREE_MANIFEST}"}
        self._delete_keys(k for k in self._list(base + "/") if k not in wanted)
        (directory / TREE_MANIFEST).write_bytes(manifest)  # this host's copy is now a valid cache entry
        log.info("published %s/%s (%d files) to s3://%s/%s", area, rel, len(files), self.bucket, base)

    # -- fetching ----------------------------------------------------------------------------------
    def fetch_file(self, area: str, rel: str, sha256: str | None = None, cache: bool = True) -> Path:
        path = self.local_path(area, rel)
        with self.cache.entry(area, rel, cache) as entry:
            if path.is_file() and (sha256 is None or entry.vouches_for(path, sha256) or sha256_of(path) == sha256):
                entry.used(path, sha256)
                return path
            got = self._get(self.key(area, rel), path, sha256)
            entry.used(path, got)
        return path

    def remote_manifest(self, area: str, rel: str) -> bytes | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=f"{self.key(area, rel)}/{TREE_MANIFEST}")["Body"]
            return body.read()
        except Exception as e:
            if self._missing(e):
                return None
            raise

    def fetch_tree(self, area: str, rel: str, cache: bool = True) -> Path:
        directory = self.local_path(area, rel)
        with self.cache.entry(area, rel, cache) as entry:
            manifest = self.remote_manifest(area, rel)
            if manifest is None:
                raise ArtifactMissing(f"{area}/{rel} is not in the store")
            local = directory / TREE_MANIFEST
            files = json.loads(manifest)["files"]
            if local.is_file() and local.read_bytes() == manifest and all(
                    (directory / n).is_file() and (directory / n).stat().st_size == f["bytes"] for n, f in files.items()):
                entry.used(directory, n_bytes=sum(f["bytes"] for f in files.values()))
                return directory
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp = directory.parent / f".tmp-{directory.name}-{uuid.uuid4().hex[:8]}"
            try:
                base = self.key(area, rel)
                for name, f in files.items():
                    self._get(f"{base}/{name}", tmp / name, f["sha256"])
                (tmp / TREE_MANIFEST).write_bytes(manifest)
                # The old copy goes aside before the new one comes in and is deleted after, so a
                # reader finds one whole tree or the other, never none while a delete runs (the steps
                # of qlora_core/fsutil.replace_dir, which `service` may not import: tests/test_layers.py).
                if directory.exists():
                    trash = directory.parent / f".trash-{directory.name}-{uuid.uuid4().hex[:8]}"
                    os.rename(directory, trash)
                    os.rename(tmp, directory)
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    os.rename(tmp, directory)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            entry.used(directory, n_bytes=sum(f["bytes"] for f in files.values()))
            log.info("fetched %s/%s (%d files) from the store", area, rel, len(files))
        return directory

    # -- reading -----------------------------------------------------------------------------------
    def exists(self, area: str, rel: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(area, rel))
            return True
        except UnsafePath:
            return False
        except Exception as e:
            if self._missing(e):
                return False
            raise

    def tree_exists(self, area: str, rel: str) -> bool:
        try:
            return self.exists(area, f"{rel}/{TREE_MANIFEST}")
        except UnsafePath:
            return False

    def size(self, area: str, rel: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self.key(area, rel))["ContentLength"])
        except Exception as e:
            if self._missing(e):
                raise ArtifactMissing(f"{area}/{rel} is not in the store") from None
            raise

    def iter_bytes(self, area: str, rel: str) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(area, rel))["Body"]
        except Exception as e:
            if self._missing(e):
                raise ArtifactMissing(f"{area}/{rel} is not in the store") from None
            raise

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        return chunks()

    def read_bytes(self, area: str, rel: str) -> bytes:
        return b"".join(self.iter_bytes(area, rel))

    def list_dirs(self, area: str) -> list[str]:
        root = f"{self.prefix}{area}/"
        names = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root, Delimiter="/"):
            for p in page.get("CommonPrefixes", []):
                names.add(p["Prefix"][len(root):].rstrip("/"))
        return sorted(n for n in names if n and not n.startswith("."))

    # -- deleting ----------------------------------------------------------------------------------
    def delete(self, area: str, rel: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(area, rel))
        super().delete(area, rel)
        self.cache.forget(area, rel)

    def delete_tree(self, area: str, rel: str, flat: bool = False) -> None:
        base = self.key(area, rel)
        keys = self._list(base + "/")
        if flat and any("/" in k[len(base) + 1:] for k in keys):
            raise UnsafePath(f"refusing to delete {area}/{rel}: it holds subdirectories")
        self._delete_keys(keys)
        super().delete_tree(area, rel)
        self.cache.forget(area, rel)

    def drop_local(self, area: str, rel: str) -> None:
        path = self.local_path(area, rel)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        self.cache.forget(area, rel)


# Note: store checksums. Every object is uploaded with the sha256 of its bytes in its metadata
# (`x-amz-meta-sha256`; S3's ETag is an MD5 only for single-part uploads, so it cannot be the
# check). Every download is written to a temp file while hashed and renamed into place only when
# the hash matches the metadata (and, for a dataset, the sha256 its `files` row recorded at upload),
# so a truncated transfer or a bit flip in the store never reaches training. A cached dataset is
# re-hashed before use unless the cache index recorded that very hash for it at the file's current
# size and mtime; a cached tree is used while its manifest equals the store's and every file it
# lists has the listed size, else it is fetched again whole.


class _Entry:
    def __init__(self, cache: "LocalCache", area: str, rel: str, tracked: bool) -> None:
        self.cache, self.area, self.rel, self.tracked = cache, area, rel, tracked
        self.record = cache.record(area, rel) if tracked else None

    def vouches_for(self, path: Path, sha256: str) -> bool:
        """True when this host hashed `path` to `sha256` and the file has not changed since (size, mtime)."""
        r = self.record or {}
        try:
            st = path.stat()
        except OSError:
            return False
        return r.get("sha256") == sha256 and r.get("bytes") == st.st_size and r.get("mtime_ns") == st.st_mtime_ns

    def used(self, path: Path, sha256: str | None = None, n_bytes: int | None = None) -> None:
        if self.tracked:
            st = path.stat()
            self.cache.touch(self.area, self.rel, st.st_size if n_bytes is None else n_bytes, sha256, st.st_mtime_ns)


class LocalCache:
    """The index of what this host fetched from the store, bounded by `max_bytes`, least recently used out.

    Entries are records under `<root>/entries/`, one per fetched file or tree, whose mtime is its
    last use. A job's own directory (its checkpoints, its adapter) is not an entry: the worker
    removes it once the job has published everything. Eviction runs after each fetch and never
    removes the entry just used.
    """

    def __init__(self, root: Path, max_bytes: int, storage: S3Storage) -> None:
        self.root, self.max_bytes, self.storage = root, max_bytes, storage
        self.entries = root / "entries"

    def _name(self, area: str, rel: str) -> Path:
        return self.entries / (hashlib.sha256(f"{area}/{rel}".encode()).hexdigest()[:32] + ".json")

    @contextlib.contextmanager
    def _flock(self, name: str) -> Iterator[None]:
        self.entries.mkdir(parents=True, exist_ok=True)
        with open(self.entries / name, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def entry(self, area: str, rel: str, tracked: bool) -> Iterator[_Entry]:
        """Hold this entry's lock (one download of a thing per host at a time), then evict if over budget."""
        lock = self._name(area, rel).with_suffix(".lock").name
        with self._flock(lock):
            yield _Entry(self, area, rel, tracked)
        if tracked:
            self.evict(keep=(area, rel))

    def record(self, area: str, rel: str) -> dict | None:
        try:
            return json.loads(self._name(area, rel).read_text())
        except (OSError, ValueError):
            return None

    def touch(self, area: str, rel: str, n_bytes: int, sha256: str | None, mtime_ns: int) -> None:
        self.entries.mkdir(parents=True, exist_ok=True)
        path = self._name(area, rel)
        tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps({"area": area, "rel": rel, "bytes": n_bytes, "sha256": sha256, "mtime_ns": mtime_ns,
                                   "used": time.time()}))
        os.replace(tmp, path)

    def forget(self, area: str, rel: str) -> None:
        self._name(area, rel).unlink(missing_ok=True)

    def evict(self, keep: tuple[str, str]) -> list[tuple[str, str]]:
        """Remove least recently used entries until the total is within max_bytes; returns what went."""
        removed = []
        with self._flock(".evict.lock"):
            records = []
            for p in self.entries.glob("*.json"):
                try:
                    r = json.loads(p.read_text())
                    records.append((float(r["used"]), int(r["bytes"]), r["area"], r["rel"]))
                except (OSError, ValueError, KeyError):
                    p.unlink(missing_ok=True)
            total = sum(r[1] for r in records)
            for used, n_bytes, area, rel in sorted(records):
                if total <= self.max_bytes:
                    break
                if (area, rel) == keep:
                    continue
                try:
                    self.storage.drop_local(area, rel)
                except (OSError, UnsafePath) as e:
                    log.warning("could not evict %s/%s from the cache: %s", area, rel, e)
                    continue
                total -= n_bytes
                removed.append((area, rel))
                log.info("evicted %s/%s (%d bytes) from the cache", area, rel, n_bytes)
        return removed


_storages: dict[tuple, Storage] = {}
_storages_lock = threading.Lock()


def get_storage(settings: Settings) -> Storage:
    """The storage these settings name (one instance per configuration in a process)."""
    ident = (settings.storage_url if settings.storage_is_s3 else "", settings.s3_endpoint_url,
             str(settings.files_dir), str(settings.artifacts_dir), str(settings.models_dir), str(settings.data_dir))
    with _storages_lock:
        if ident not in _storages:
            _storages[ident] = S3Storage(settings) if settings.storage_is_s3 else Storage(settings)
        return _storages[ident]


def model_remote(settings: Settings) -> Storage | None:
    """What `qlora_core.store.ModelStore(settings.models_dir, remote=...)` takes: the S3 store, or None locally."""
    storage = get_storage(settings)
    return storage if storage.remote else None


def ensure_adapter_archive(storage: Storage, adapter_rel: str, archive_rel: str) -> None:
    """Make sure the store holds `archive_rel`, the `.tar.gz` of the adapter directory `adapter_rel`.

    Locally this is `service.storage.adapter_archive` (built on first request, rebuilt when older
    than its adapter). With S3 an archive in the store is final (adapters never change once
    published); a missing one is built here from a fetched copy of the adapter and published.

    Raises:
        ArtifactMissing: neither the archive nor the adapter files are in the store.
        UnsafePath: a path leaves the artifacts area.
    """
    from service.storage import adapter_archive, build_adapter_archive

    if not storage.remote:
        adapter_archive(storage.dirs["artifacts"], adapter_rel, archive_rel)
        return
    if storage.exists("artifacts", archive_rel):
        return
    adapter_dir = storage.fetch_tree("artifacts", adapter_rel, cache=False)
    try:
        build_adapter_archive(adapter_dir, storage.local_path("artifacts", archive_rel))
        storage.publish_file("artifacts", archive_rel)
    finally:
        storage.drop_local("artifacts", archive_rel)
        storage.drop_local("artifacts", adapter_rel)
