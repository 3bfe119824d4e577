"""What a job produces: its events (list or Server-Sent Events), checkpoints and adapter downloads.

Events and checkpoints are OpenAI's (`fine_tuning.job.event`, `fine_tuning.job.checkpoint`),
newest first. `?stream=true` on the events endpoint streams them instead as `text/event-stream`,
oldest first, each as `data: {json}`, polling the database until the job is finished.
The adapter endpoints are our extension (Together's API has the same idea): a `.tar.gz` whose
root holds PEFT's `adapter_config.json` and `adapter_model.safetensors`. So is `.../merged`, the
adapter merged into its base in 16 bits as a Hugging Face model directory: a worker builds it on
the first request (worker/export.py) and the API serves the cached archive from then on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import func, select, update
from starlette.concurrency import run_in_threadpool

from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.downloads import stored_file_response
from api.errors import APIError, bad_request, not_found
from api.routes.jobs import get_job
from api.routes.pagination import paginate
from api.schemas import (CheckpointList, CheckpointObject, ErrorResponse, JobEventList,
                         JobEventObject, MergedExportPending)
from service import queue
from service.database import session_scope
from service.db import FINISHED_STATUSES, Checkpoint, Job, JobEvent, now
from service.objectstore import ensure_adapter_archive, get_storage
from service.settings import Settings
from service.storage import ArtifactMissing, UnsafePath, job_archive_rel, merged_archive_rel

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"],
                   responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse},
                              404: {"model": ErrorResponse}})

STREAM_POLL_S = 0.5
_TARGZ = {200: {"content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
                "description": "a .tar.gz with adapter_config.json and adapter_model.safetensors at its root"}}
_EVENTS = {200: {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobEventList"}},
                             # OpenAPI 3.1: the schema of an event stream describes each event.
                             "text/event-stream": {"schema": {
                                 "type": "object", "required": ["data"],
                                 "properties": {"id": {"type": "string"}, "event": {"type": "string"},
                                                "data": {"type": "string", "contentMediaType": "application/json",
                                                         "contentSchema": {"$ref": "#/components/schemas/JobEventObject"}}}}}}}}


# Note: late commits. Event `seq`s are assigned at INSERT but become visible at COMMIT, so when two
# writers add events to one job at once (an API cancel beside the worker's metrics, a takeover), a
# row with a lower seq can appear after a higher one was streamed. The stream therefore re-reads a
# window of REREAD_WINDOW seqs behind its cursor and skips the ids it already sent.
REREAD_WINDOW = 64


def _event_rows_after(database_url: str, job_id: str, after_seq: int) -> tuple[list[tuple[int, dict]], bool]:
    with session_scope(database_url) as s:
        # Status first, events second: a job's final status commits together with its last event,
        # so reading in this order never ends the stream before that event is delivered.
        status = s.scalar(select(Job.status).where(Job.id == job_id))
        rows = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
                              .order_by(JobEvent.seq).limit(500)))
        return [(e.seq, JobEventObject.from_row(e).model_dump()) for e in rows], status in FINISHED_STATUSES


async def _stream(request: Request, database_url: str, job_id: str, after_seq: int) -> AsyncIterator[str]:
    last = after_seq  # highest seq sent
    sent: set[int] = set()  # seqs sent within the re-read window
    while True:
        rows, finished = await run_in_threadpool(
            _event_rows_after, database_url, job_id, max(after_seq, last - REREAD_WINDOW))
        fresh = [(seq, ev) for seq, ev in rows if seq not in sent]
        for seq, ev in fresh:
            sent.add(seq)
            last = max(last, seq)
            yield f"id: {ev['id']}\ndata: {json.dumps(ev)}\n\n"
        sent = {seq for seq in sent if seq > last - REREAD_WINDOW}
        if finished and not fresh:
            return
        if not fresh:
            if await request.is_disconnected():
                return
            await asyncio.sleep(STREAM_POLL_S)


@router.get("/{job_id}/events", response_model=JobEventList, responses=_EVENTS)
def list_events(
    job_id: str,
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    stream: bool = False,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> JobEventList | StreamingResponse:
    """A job's events, newest first; with `stream=true`, Server-Sent Events oldest first until the job ends.

    When streaming, `after` (or the `Last-Event-ID` header of a reconnecting client) resumes after
    that event.
    """
    job = get_job(session, principal.tenant_id, job_id)
    if stream:
        cursor = after or last_event_id
        after_seq = 0
        if cursor:
            seq = session.scalar(select(JobEvent.seq).where(JobEvent.job_id == job.id, JobEvent.id == cursor))
            if seq is None:
                raise bad_request(f"Invalid 'after': no event {cursor!r} in job {job_id}.", param="after",
                                  code="invalid_cursor")
            after_seq = seq
        return StreamingResponse(_stream(request, settings.database_url, job.id, after_seq),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    rows, has_more = paginate(session, select(JobEvent).where(JobEvent.job_id == job.id), JobEvent, after, limit)
    return JobEventList(data=[JobEventObject.from_row(e) for e in rows], has_more=has_more)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(
    job_id: str,
    principal: PrincipalDep,
    session: SessionDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> CheckpointList:
    """A job's checkpoints, newest (highest step) first."""
    job = get_job(session, principal.tenant_id, job_id)
    stmt = select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.tenant_id == principal.tenant_id)
    rows, has_more = paginate(session, stmt, Checkpoint, after, limit, order_col=Checkpoint.step_number)
    data = [CheckpointObject.from_row(c) for c in rows]
    return CheckpointList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                          last_id=data[-1].id if data else None)


def _send_archive(settings: Settings, adapter_rel: str, archive_rel: str, download_name: str, what: str) -> Response:
    storage = get_storage(settings)
    try:
        ensure_adapter_archive(storage, adapter_rel, archive_rel)
        return stored_file_response(storage, "artifacts", archive_rel, "application/gzip", download_name)
    except (ArtifactMissing, UnsafePath):
        raise APIError(410, f"The adapter files of {what} are no longer available on this server.",
                       code="artifact_missing") from None


def _check_succeeded(job: Job, job_id: str, what: str, code: str) -> None:
    """410 `model_deleted` once the job's fine-tuned model was deleted; 400 `code` before the job succeeded."""
    if job.status == "succeeded" and not job.adapter_path:  # See service/db.py, Job.adapter_path
        raise APIError(410, f"The fine-tuned model {job.fine_tuned_model} of job {job_id} was deleted "
                       "(DELETE /v1/models), and its adapter with it; the job's checkpoints keep theirs.",
                       param="fine_tuning_job_id", code="model_deleted")
    if job.status != "succeeded" or not job.adapter_path:
        raise bad_request(f"Job {job_id} has status {job.status!r}; its {what} is available once it has succeeded.",
                          param="fine_tuning_job_id", code=code)


@router.get("/{job_id}/adapter", response_class=FileResponse, responses={**_TARGZ, 410: {"model": ErrorResponse}})
def download_adapter(job_id: str, principal: PrincipalDep, session: SessionDep, settings: SettingsDep) -> Response:
    """The final LoRA adapter of a succeeded job (`peft.PeftModel.from_pretrained` loads it).

    410 `model_deleted` once the job's fine-tuned model was deleted.
    """
    job = get_job(session, principal.tenant_id, job_id)
    _check_succeeded(job, job_id, "adapter", code="adapter_not_ready")
    session.close()  # a long download must not hold a pooled connection
    return _send_archive(settings, job.adapter_path, job_archive_rel(job.id),
                         f"{job.id}-adapter.tar.gz", f"job {job_id}")


@router.get("/{job_id}/checkpoints/{checkpoint_id}/adapter", response_class=FileResponse,
            responses={**_TARGZ, 410: {"model": ErrorResponse}})
def download_checkpoint_adapter(job_id: str, checkpoint_id: str, principal: PrincipalDep, session: SessionDep,
                                settings: SettingsDep) -> Response:
    """The LoRA adapter saved at one checkpoint of a job (any status)."""
    job = get_job(session, principal.tenant_id, job_id)
    ckpt = session.scalar(select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.job_id == job.id,
                                                   Checkpoint.tenant_id == principal.tenant_id))
    if ckpt is None:
        raise not_found("checkpoint", checkpoint_id)
    session.close()
    return _send_archive(settings, ckpt.adapter_path, f"downloads/{job.id}/{ckpt.id}.tar.gz",
                         f"{job.id}-step-{ckpt.step_number}-adapter.tar.gz", f"checkpoint {checkpoint_id}")


# Note: merged export requests. A poll answers from the job's `merged_export` (See Note: merged
# export in service/db.py) and sends a build message only when none is on its way: on the first
# request; after a failed build, once its retry is due (MERGE_RETRY_S, doubling with each attempt
# up to MERGE_RETRY_MAX_S); and when a request has gone unanswered for MERGE_STALE_S (its message
# lost with a broker outage). A duplicate costs at most a second build, never a corrupt archive:
# the task does nothing once the archive exists, and two builds rename whole archives into place.
MERGE_POLL_S = 10
MERGE_STALE_S = 3600
MERGE_RETRY_S = 60
MERGE_RETRY_MAX_S = 3600


def _retry_after(required: bool) -> dict:
    return {"Retry-After": {"description": "seconds to wait before asking again", "required": required,
                            "schema": {"type": "integer", "minimum": 1}}}


_MERGED = {200: {"content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
                 "description": "a .tar.gz with a Hugging Face model directory (config.json, tokenizer files, "
                                "*.safetensors in 16 bits) at its root"},
           202: {"model": MergedExportPending, "headers": _retry_after(required=True),
                 "description": "a worker is building the archive; ask again after Retry-After seconds"},
           410: {"model": ErrorResponse},
           500: {"model": ErrorResponse, "headers": _retry_after(required=False),  # not on internal_error
                 "description": "`merge_failed`: the build failed; a request after Retry-After seconds tries again"}}


def _retry_due(state: dict) -> int:
    """When a failed build may be tried again (Unix seconds; See Note: merged export requests)."""
    delay = min(MERGE_RETRY_S * 2 ** max(int(state.get("attempts") or 1) - 1, 0), MERGE_RETRY_MAX_S)
    return int(state.get("finished_at") or state.get("requested_at") or 0) + delay


def _swap_request(session: SessionDep, job_id: str, old: dict, new: dict) -> bool:
    """Replace the job's `merged_export` by `new` if it still holds `old`'s request; commit."""
    guard = func.coalesce(Job.merged_export["request_id"].as_string(), "") == (old.get("request_id") or "")
    changed = session.execute(update(Job).where(Job.id == job_id, guard).values(merged_export=new)
                              .execution_options(synchronize_session=False)).rowcount == 1
    session.commit()
    return changed


def _request_build(session: SessionDep, job_id: str, state: dict, t: int) -> dict:
    """Record a new build request and send its message; returns the request now in force."""
    new = {"status": "building", "request_id": secrets.token_hex(8), "requested_at": t,
           "attempts": int(state.get("attempts") or 0) + 1, "error": None}
    if not _swap_request(session, job_id, state, new):  # a concurrent poll sent one first
        return session.scalar(select(Job.merged_export).where(Job.id == job_id)) or new
    try:
        queue.enqueue_export(job_id)
    except BrokerError as e:  # undo, so that the next poll sends it again
        log.warning("could not enqueue the merged export of %s now: %s", job_id, e)
        _swap_request(session, job_id, new, state)
    return new


@router.get("/{job_id}/merged", response_class=FileResponse, response_model=None, responses=_MERGED)
def download_merged(job_id: str, principal: PrincipalDep, session: SessionDep,
                    settings: SettingsDep) -> Response:
    """The job's adapter merged into its base in 16 bits: a `.tar.gz` of a Hugging Face model directory.

    The extracted directory loads with `AutoModelForCausalLM.from_pretrained`, no PEFT needed. The
    first request has a worker build it: 202 with `Retry-After` until it is there, then 200 with
    the cached archive. 400 `job_not_succeeded` before the job succeeded, 410 `model_deleted` once its
    model was deleted, 500 `merge_failed` when the build failed (it is retried after `Retry-After`).
    """
    job = get_job(session, principal.tenant_id, job_id)
    _check_succeeded(job, job_id, "merged model", code="job_not_succeeded")
    storage = get_storage(settings)
    try:
        return stored_file_response(storage, "artifacts", merged_archive_rel(job.id), "application/gzip",
                                    f"{job.id}-merged.tar.gz")
    except (ArtifactMissing, UnsafePath):
        pass  # not built yet
    try:
        adapter_found = storage.exists("artifacts", f"{job.adapter_path}/adapter_config.json")
    except UnsafePath:
        adapter_found = False
    if not adapter_found:  # nothing to build from: say so now rather than after a doomed build
        raise APIError(410, f"The adapter files of job {job_id} are no longer available on this server.",
                       code="artifact_missing")
    state, t = dict(job.merged_export or {}), now()
    # A failed build is the server's fault, not the client's: the job succeeded and the request is
    # valid, and what fails (a base model gone from the store, memory, disk) is the server's to fix. So a
    # 5xx, and 500 rather than 503: it is no overload that passes by itself, though a retry may succeed.
    if state.get("status") == "failed" and t < _retry_due(state):
        error, wait = state.get("error") or {}, _retry_due(state) - t
        raise APIError(500, f"Building the merged model of job {job_id} failed ({error.get('code')}): "
                       f"{error.get('message')} A request after {wait} s tries again.", type="server_error",
                       code="merge_failed", headers={"Retry-After": str(wait)})
    if state.get("status") != "building" or t - int(state.get("requested_at") or 0) >= MERGE_STALE_S:
        state = _request_build(session, job.id, state, t)
    message = f"The merged model of job {job_id} is being built; ask again in {MERGE_POLL_S} s."
    body = MergedExportPending(fine_tuning_job_id=job.id, requested_at=int(state.get("requested_at") or t),
                               retry_after=MERGE_POLL_S, message=message)
    return JSONResponse(body.model_dump(), status_code=202, headers={"Retry-After": str(MERGE_POLL_S)})
