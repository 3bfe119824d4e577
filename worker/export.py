"""The task "qlora.export_merged": build a succeeded job's merged 16-bit model, once, as one `.tar.gz`.

`GET /v1/fine_tuning/jobs/{id}/merged` records a request on the job row and sends only the job id
(See Note: merged export in service/db.py). Here the adapter is merged into a 16-bit copy of its
base with PEFT's `merge_and_unload` (qlora_core.export.merge_adapter_16bit, which says why never
into the 4-bit base), saved with the tokenizer as a standard Hugging Face model directory, and
packed into `artifacts_dir/jobs/<id>/merged.tar.gz` with the directory's files at the archive
root; the unpacked directory is removed. A duplicate message for a job whose archive exists does
nothing, and two builds at once each write their own temporary files and rename a complete
archive into place (service.storage._write_tar_gz), so the archive is never a mix of the two.

The merge runs on the CPU (transformers' default device): it is one pass of additions, it needs
the host memory of one 16-bit copy of the base (about 14 GB for a 7B model), and it leaves the
GPU to training jobs.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, update

from service.database import get_worker_engine
from service.db import Job
from service.queue import TASK_EXPORT_MERGED
from service.settings import Settings, get_settings
from service.objectstore import get_storage
from service.storage import ArtifactMissing, UnsafePath, build_model_archive, merged_archive_rel
from worker.app import app

log = logging.getLogger(__name__)

_jobs = Job.__table__

# Builds of one request whose worker process died before they finished, before it is failed.
MAX_BUILD_STARTS = 3


class MergeFailed(Exception):
    """A build that cannot succeed as things stand, with the code the API reports."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@app.task(name=TASK_EXPORT_MERGED, ignore_result=True)
def export_merged(job_id: str) -> str:
    """Build the merged model archive of job `job_id`. Returns what happened (for logs and tests)."""
    settings = get_settings()
    return export_merged_here(get_worker_engine(settings.database_url, settings.lease_s), settings, job_id)


def export_merged_here(engine: Engine, settings: Settings, job_id: str) -> str:
    """The body of the task, callable without Celery.

    Returns:
        "built"; "exists" when the archive was already there; "skipped" when the job is unknown,
        not succeeded, or its model was deleted (before or during the build); "failed" when the
        build failed (the error is recorded on the job for the API).
    """
    job = _load(engine, job_id)
    if job is None or job.status != "succeeded" or not job.adapter_path:
        log.info("merged export of %s: no succeeded job with an adapter; nothing to do", job_id)
        return "skipped"
    request = dict(job.merged_export or {})
    storage = get_storage(settings)
    archive = storage.local_path("artifacts", merged_archive_rel(job_id))
    if storage.exists("artifacts", merged_archive_rel(job_id)):
        _record(engine, job_id, request, status="succeeded", error=None)
        return "exists"
    # See Note: late acks and lost workers in service/queue.py: a child killed while it builds (the
    # OOM killer) has its message delivered again; count the starts so that cannot loop forever.
    starts = int(request.get("build_starts") or 0) + 1
    if starts > MAX_BUILD_STARTS:
        message = (f"The worker process building the merged model died {starts - 1} times (out of host memory? "
                   "a 16-bit copy of the base must fit); giving up until the next request.")
        _record(engine, job_id, request, status="failed", error={"code": "worker_lost", "message": message})
        return "failed"
    if not _update(engine, job_id, request, build_starts=starts):
        return "skipped"  # a newer request was made meanwhile: its own message builds it
    request["build_starts"] = starts
    started = time.monotonic()
    try:
        try:
            adapter_dir = storage.fetch_tree("artifacts", job.adapter_path)
        except (ArtifactMissing, UnsafePath):
            raise MergeFailed("artifact_missing", "The adapter files of this job are no longer on this server.") from None
        build_merged_archive(settings, job.model, adapter_dir, archive)
        storage.publish_file("artifacts", merged_archive_rel(job_id))
    except MergeFailed as e:
        log.warning("merged export of %s failed: %s: %s", job_id, e.code, e.message)
        _record(engine, job_id, request, status="failed", error={"code": e.code, "message": e.message})
        return "failed"
    except Exception as e:  # the user gets one line, the log the traceback
        log.exception("merged export of %s failed with an unexpected error", job_id)
        first_line = (str(e).strip().splitlines() or [""])[0][:500]
        message = f"{type(e).__name__}: {first_line}".rstrip(": ")
        _record(engine, job_id, request, status="failed", error={"code": "internal_error", "message": message})
        return "failed"
    if not (_load(engine, job_id).adapter_path):  # deleted while we built: nothing may outlive the model
        storage.delete("artifacts", merged_archive_rel(job_id))
        return "skipped"
    n_bytes = archive.stat().st_size
    storage.drop_local("artifacts", merged_archive_rel(job_id))  # with S3: the store keeps it, not this host
    _record(engine, job_id, request, status="succeeded", error=None, bytes=n_bytes)
    log.info("merged export of %s: %s (%.1f s)", job_id, archive, time.monotonic() - started)
    return "built"


def build_merged_archive(settings: Settings, base_model: str, adapter_dir: Path, dest: Path) -> Path:
    """Merge `adapter_dir` into a 16-bit copy of `base_model` and pack the model directory into `dest`.

    Raises:
        MergeFailed: `model_not_found` (the base is no longer in the model store) or
            `artifact_missing` (the adapter files are gone).
        Exception: anything the merge itself raises.
    """
    from qlora_core.export import merge_adapter_16bit
    from qlora_core.store import ModelStore
    from service.objectstore import model_remote

    try:
        model_dir = ModelStore(settings.models_dir, remote=model_remote(settings)).model_path(base_model)
    except KeyError:
        raise MergeFailed("model_not_found", f"The base model {base_model} is no longer in the model store "
                          "of this server (`qlora models list`).") from None
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MergeFailed("artifact_missing", "The adapter files of this job are no longer on this server.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A private scratch dir per build: concurrent builds never share a file, and the unpacked
    # model (as large as the archive) is removed whatever happens.
    with tempfile.TemporaryDirectory(prefix=".merged.", dir=dest.parent) as scratch:
        merged = merge_adapter_16bit(model_dir, adapter_dir, Path(scratch) / "model", dtype=merged_dtype(model_dir))
        return build_model_archive(merged, dest)


# Note: merged dtype. The merged checkpoint is for other servers (vLLM, TGI, transformers), which
# load it in the dtype its config.json names, on devices we never see; so the worker's own device
# does not decide it. bfloat16 has float32's exponent range (a merged weight cannot overflow) and is
# what current bases ship in; a base whose config says float16 stays float16, the dtype it was
# released and validated in, which its servers expect (and bf16 would round its weights coarser).
def merged_dtype(model_dir: Path) -> str:
    """"float16" when the base model's config.json says so, else "bfloat16" (See Note: merged dtype)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    declared = config.get("torch_dtype") or config.get("dtype")
    return "float16" if declared == "float16" else "bfloat16"


def _load(engine: Engine, job_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(_jobs).where(_jobs.c.id == job_id)).first()


def _update(engine: Engine, job_id: str, request: dict[str, Any], **changes: Any) -> bool:
    """Update `merged_export` with `changes`, unless the API has since made a new request.

    The guard is the request's id (See Note: merged export in service/db.py): a newer request's
    message is still on its way and records its own outcome, which this one must not overwrite.
    """
    current = func.coalesce(_jobs.c.merged_export["request_id"].as_string(), "")
    same_request = current == (request.get("request_id") or "")
    with engine.begin() as conn:
        return conn.execute(update(_jobs).where(_jobs.c.id == job_id, same_request)
                            .values(merged_export={**request, **changes})).rowcount == 1


def _record(engine: Engine, job_id: str, request: dict[str, Any], **changes: Any) -> bool:
    """Write the build's outcome (`status`, `error`, ...) into `merged_export`; see `_update`."""
    return _update(engine, job_id, request, **changes, finished_at=int(time.time()))
