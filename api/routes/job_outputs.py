"""What a job produces: its events (list or Server-Sent Events), checkpoints and adapter downloads.

Events and checkpoints are OpenAI's (`fine_tuning.job.event`, `fine_tuning.job.checkpoint`),
newest first. `?stream=true` on the events endpoint streams them instead as `text/event-stream`,
oldest first, each as `data: {json}`, polling the database until the job is finished.
The adapter endpoints are our extension (Together's API has the same idea): a `.tar.gz` whose
root holds PEFT's `adapter_config.json` and `adapter_model.safetensors`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.errors import APIError, bad_request, not_found
from api.routes.jobs import get_job
from api.routes.pagination import paginate
from api.schemas import (CheckpointList, CheckpointObject, ErrorResponse, JobEventList,
                         JobEventObject)
from service.database import session_scope
from service.db import FINISHED_STATUSES, Checkpoint, Job, JobEvent
from service.storage import ArtifactMissing, UnsafePath, adapter_archive, job_archive_rel, resolve_under

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


def _send_archive(settings_artifacts, adapter_rel: str, cache_rel: str, download_name: str, what: str) -> FileResponse:
    try:
        prebuilt = resolve_under(settings_artifacts, cache_rel)
        path = prebuilt if prebuilt.is_file() else adapter_archive(settings_artifacts, adapter_rel, cache_rel)
    except (ArtifactMissing, UnsafePath):
        raise APIError(410, f"The adapter files of {what} are no longer available on this server.",
                       code="artifact_missing") from None
    return FileResponse(path, media_type="application/gzip", filename=download_name)


@router.get("/{job_id}/adapter", response_class=FileResponse, responses={**_TARGZ, 410: {"model": ErrorResponse}})
def download_adapter(job_id: str, principal: PrincipalDep, session: SessionDep, settings: SettingsDep) -> FileResponse:
    """The final LoRA adapter of a succeeded job (`peft.PeftModel.from_pretrained` loads it).

    410 `model_deleted` once the job's fine-tuned model was deleted.
    """
    job = get_job(session, principal.tenant_id, job_id)
    if job.status == "succeeded" and not job.adapter_path:  # See service/db.py, Job.adapter_path
        raise APIError(410, f"The fine-tuned model {job.fine_tuned_model} of job {job_id} was deleted "
                       "(DELETE /v1/models), and its adapter with it; the job's checkpoints keep theirs.",
                       param="fine_tuning_job_id", code="model_deleted")
    if job.status != "succeeded" or not job.adapter_path:
        raise bad_request(f"Job {job_id} has status {job.status!r}; its adapter is available once it has succeeded.",
                          param="fine_tuning_job_id", code="adapter_not_ready")
    return _send_archive(settings.artifacts_dir, job.adapter_path, job_archive_rel(job.id),
                         f"{job.id}-adapter.tar.gz", f"job {job_id}")


@router.get("/{job_id}/checkpoints/{checkpoint_id}/adapter", response_class=FileResponse,
            responses={**_TARGZ, 410: {"model": ErrorResponse}})
def download_checkpoint_adapter(job_id: str, checkpoint_id: str, principal: PrincipalDep, session: SessionDep,
                                settings: SettingsDep) -> FileResponse:
    """The LoRA adapter saved at one checkpoint of a job (any status)."""
    job = get_job(session, principal.tenant_id, job_id)
    ckpt = session.scalar(select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.job_id == job.id,
                                                   Checkpoint.tenant_id == principal.tenant_id))
    if ckpt is None:
        raise not_found("checkpoint", checkpoint_id)
    return _send_archive(settings.artifacts_dir, ckpt.adapter_path, f"downloads/{job.id}/{ckpt.id}.tar.gz",
                         f"{job.id}-step-{ckpt.step_number}-adapter.tar.gz", f"checkpoint {checkpoint_id}")
