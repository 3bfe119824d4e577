"""The file and artifact store on local disk.

Uploads live at `files_dir/<tenant_id>/<file_id>.jsonl`, and the results CSV the worker writes for
a succeeded job at `files_dir/<tenant_id>/<file_id>.csv`: the path is built from ids the service
minted, never from the client's file name (a name like `../../etc/passwd` is only ever a label).
An upload is streamed to a temporary file next to its final place while its bytes are counted
and hashed; at the size cap the writer stops and the partial file is deleted (FastAPI has no
upload limit of its own, REFERENCES.md "FastAPI"). Artifact paths recorded in the database are
relative to `artifacts_dir` and are resolved with a containment check, so a bad row cannot make
the API serve a file outside the store. Adapter downloads are `.tar.gz` files whose root holds
`adapter_config.json` and `adapter_model.safetensors`, PEFT's `save_pretrained` layout; a merged
model's is a Hugging Face model directory (`build_model_archive`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
OPTIONAL_ADAPTER_FILES = ("README.md",)


def job_archive_rel(job_id: str) -> str:
    """Where a job's final adapter archive lives, relative to artifacts_dir (the worker builds it there)."""
    return f"jobs/{_safe_component(job_id)}/adapter.tar.gz"


def merged_archive_rel(job_id: str) -> str:
    """Where a job's merged 16-bit model archive lives, relative to artifacts_dir (worker/export.py builds it)."""
    return f"jobs/{_safe_component(job_id)}/merged.tar.gz"


class UploadTooLarge(Exception):
    """The upload passed the byte cap; nothing of it is kept."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"file is larger than the limit of {limit} bytes")
        self.limit = limit


class UnsafePath(ValueError):
    """A stored path points outside the directory it must live in."""


class ArtifactMissing(FileNotFoundError):
    """An artifact the database points at is not (or no longer) on disk."""


@dataclass
class StoredFile:
    rel_path: str  # relative to files_dir, as stored in files.storage_path
    path: Path
    bytes: int
    sha256: str


def _safe_component(value: str) -> str:
    if not value or "/" in value or "\\" in value or value in (".", "..") or "\0" in value:
        raise UnsafePath(f"not a safe path component: {value!r}")
    return value


def resolve_under(root: Path, rel: str | os.PathLike[str]) -> Path:
    """Resolve `rel` against `root` and refuse anything that escapes `root`.

    Args:
        root: the store directory (files_dir or artifacts_dir).
        rel: a stored relative path (an absolute one is accepted only when it lies under root).

    Returns:
        The absolute, resolved path.

    Raises:
        UnsafePath: the path leaves `root` (`..`, an absolute path elsewhere, a symlink out).
    """
    base = Path(root).resolve()
    p = Path(rel)
    candidate = (p if p.is_absolute() else base / p).resolve()
    if candidate != base and base not in candidate.parents:
        raise UnsafePath(f"path {str(rel)!r} is outside {base}")
    return candidate


class FileSink:
    """Write one file to `files_dir/<tenant>/<file_id><suffix>`, counting and hashing as it goes.

    Use `write()` for each chunk, then `finish()`; `abort()` (or any exception in `write`)
    removes the partial file. `suffix` is ".jsonl" for uploads, ".csv" for a job's results.
    """

    def __init__(self, files_dir: Path, tenant_id: str, file_id: str, max_bytes: int, suffix: str = ".jsonl") -> None:
        if suffix not in (".jsonl", ".csv"):
            raise ValueError(f"file suffix must be .jsonl or .csv, got {suffix!r}")
        self.rel_path = f"{_safe_component(tenant_id)}/{_safe_component(file_id)}{suffix}"
        self.path = resolve_under(files_dir, self.rel_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.n_bytes = 0
        self._hash = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=f".{file_id}.", suffix=".part", dir=self.path.parent)
        self._tmp = Path(tmp)
        self._fh = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        """Append a chunk. Raises UploadTooLarge (and deletes the partial file) past the cap."""
        if self.n_bytes + len(chunk) > self.max_bytes:
            self.abort()
            raise UploadTooLarge(self.max_bytes)
        self._fh.write(chunk)
        self._hash.update(chunk)
        self.n_bytes += len(chunk)

    def finish(self) -> StoredFile:
        """Flush, fsync and move the file to its final name."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp, self.path)
        return StoredFile(self.rel_path, self.path, self.n_bytes, self._hash.hexdigest())

    def abort(self) -> None:
        """Close and delete the partial file (idempotent)."""
        if not self._fh.closed:
            self._fh.close()
        self._tmp.unlink(missing_ok=True)


def write_file(files_dir: Path, tenant_id: str, file_id: str, data: bytes, suffix: str) -> StoredFile:
    """Store `data` whole as `files_dir/<tenant>/<file_id><suffix>`, atomically (temp file, fsync, rename).

    Raises:
        UnsafePath: an id is not a safe path component.
        OSError: the file could not be written (nothing is left behind).
    """
    sink = FileSink(files_dir, tenant_id, file_id, max_bytes=len(data), suffix=suffix)
    try:
        sink.write(data)
        return sink.finish()
    except BaseException:
        sink.abort()
        raise


def file_path(files_dir: Path, rel_path: str) -> Path:
    """The on-disk path of a stored upload (raises UnsafePath / ArtifactMissing)."""
    path = resolve_under(files_dir, rel_path)
    if not path.is_file():
        raise ArtifactMissing(f"stored file {rel_path!r} is missing")
    return path


def delete_file(files_dir: Path, rel_path: str) -> None:
    """Remove a stored upload from disk; a missing file is not an error."""
    resolve_under(files_dir, rel_path).unlink(missing_ok=True)


def check_adapter_dir(adapter_dir: Path) -> None:
    """Raise ArtifactMissing unless `adapter_dir` holds PEFT's adapter files."""
    missing = [n for n in ADAPTER_FILES if not (adapter_dir / n).is_file()]
    if missing:
        raise ArtifactMissing(f"adapter directory {adapter_dir} lacks {', '.join(missing)}")


def _write_tar_gz(dest: Path, members: Iterable[tuple[Path, str]], compresslevel: int = 9) -> Path:
    """Write `(path, arcname)` members into `dest`, atomically: temp file, fsync, rename.

    Two writers of one `dest` each fill a temp file of their own, so the last rename wins and the
    archive is always one complete build, never a mix.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w:gz", compresslevel=compresslevel) as tar:
                for path, arcname in members:
                    tar.add(path, arcname=arcname, recursive=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(dest.parent, os.O_RDONLY)
    try:  # the rename itself survives a power loss only once its directory is synced
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return dest


def build_adapter_archive(adapter_dir: Path, dest: Path) -> Path:
    """Pack an adapter directory into `dest` (.tar.gz, files at the archive root), atomically.

    Only the PEFT files are packed: `state.pt` (optimizer state) and markers stay behind.

    Raises:
        ArtifactMissing: the directory lacks adapter_config.json or adapter_model.safetensors.
    """
    check_adapter_dir(adapter_dir)
    names = [n for n in ADAPTER_FILES + OPTIONAL_ADAPTER_FILES if (adapter_dir / n).is_file()]
    return _write_tar_gz(dest, [(adapter_dir / n, n) for n in names])


def build_model_archive(model_dir: Path, dest: Path) -> Path:
    """Pack a Hugging Face model directory (config, tokenizer, safetensors) into `dest`, atomically.

    Every file of the directory goes to the archive root, so `tar xzf` gives a directory that
    `AutoModelForCausalLM.from_pretrained` loads. Level 1 compression: 16-bit weights barely
    compress, and level 9 would take several times as long (minutes for a 7B model) to save a few percent.

    Raises:
        ArtifactMissing: the directory holds no config.json.
    """
    if not (model_dir / "config.json").is_file():
        raise ArtifactMissing(f"model directory {model_dir} has no config.json")
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    return _write_tar_gz(dest, [(p, p.name) for p in files], compresslevel=1)


def adapter_archive(artifacts_dir: Path, adapter_rel: str, cache_rel: str) -> Path:
    """The `.tar.gz` of an adapter, built on first request and cached under artifacts_dir.

    Args:
        artifacts_dir: the artifact store root.
        adapter_rel: the adapter directory, relative to artifacts_dir (as stored in the DB).
        cache_rel: where the archive is kept, relative to artifacts_dir.

    Returns:
        The path of the archive.

    Raises:
        UnsafePath: a path escapes artifacts_dir.
        ArtifactMissing: the adapter files are not on disk.
    """
    archive = resolve_under(artifacts_dir, cache_rel)
    adapter_dir = resolve_under(artifacts_dir, adapter_rel)
    if archive.is_file() and _newer_than_sources(archive, adapter_dir):
        return archive
    if not adapter_dir.is_dir():
        raise ArtifactMissing(f"adapter directory {adapter_rel!r} is missing")
    log.info("building adapter archive %s", archive)
    return build_adapter_archive(adapter_dir, archive)


def _newer_than_sources(archive: Path, adapter_dir: Path) -> bool:
    # An archive whose adapter directory was pruned is still the best copy there is.
    sources = [adapter_dir / n for n in ADAPTER_FILES if (adapter_dir / n).is_file()]
    return all(archive.stat().st_mtime >= s.stat().st_mtime for s in sources)


def delete_adapter(artifacts_dir: Path, adapter_rels: Iterable[str], archive_rel: str,
                   derived_rels: Iterable[str] = ()) -> None:
    """Remove an adapter's directory and its `.tar.gz` from the store; whatever is already gone is skipped.

    Every path is checked before anything is removed.

    Args:
        artifacts_dir: the artifact store root.
        adapter_rels: the adapter's directory, relative to artifacts_dir, as each row records it
            (the job's and the model's rows name the same one).
        archive_rel: its archive, relative to artifacts_dir.
        derived_rels: other files made from the adapter (the merged model's archive), removed with it.

    Raises:
        UnsafePath: a path escapes artifacts_dir, or is not one adapter's directory: it holds the
            archive or a subdirectory (PEFT saves one adapter flat), as the job's directory, its
            `checkpoints/` or the whole store would. A bad row must never remove more than that.
        OSError: a file could not be removed.
    """
    root = Path(artifacts_dir).resolve()
    archive = resolve_under(root, archive_rel)
    derived = [resolve_under(root, rel) for rel in derived_rels]
    dirs = {resolve_under(root, rel) for rel in adapter_rels}
    for d in dirs:
        if d == root or d in archive.parents or (d.is_dir() and any(c.is_dir() for c in d.iterdir())):
            raise UnsafePath(f"refusing to delete {str(d)!r}: it is not one adapter directory")
    # The archives first: once the directory is gone, adapter_archive() would still serve it.
    for f in (archive, *derived):
        f.unlink(missing_ok=True)
    for d in dirs:
        if d.is_dir():
            shutil.rmtree(d)
        else:
            d.unlink(missing_ok=True)
    log.info("deleted adapter %s and its archive %s", ", ".join(map(str, sorted(dirs))), archive)
