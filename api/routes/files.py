"""`/v1/files`: upload, list, retrieve, download and delete training files (OpenAI's Files API).

Besides the uploads (purpose `fine-tune`), a tenant's files include the results CSV of each of its
succeeded jobs (purpose `fine-tune-results`, written by the worker: worker/results.py); they are
listed, read and deleted like any file, but cannot be uploaded or trained on.

An upload is streamed to disk under a service-minted name with the size cap enforced while
reading (api/upload.py), hashed, then validated line by line with
`qlora_core.validate.validate_jsonl`; a bad file is refused with 400 listing its line numbers
and what is wrong on each, and nothing of it is kept.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.errors import APIError, bad_request, not_found
from api.routes.pagination import paginate
from api.schemas import ErrorResponse, FileDeleted, FileList, FileObject
from api.downloads import stored_file_response
from api.upload import receive_upload
from qlora_core.validate import validate_jsonl
from service.db import ACTIVE_STATUSES, RESULTS_PURPOSE, File, Job, new_id, now
from service.objectstore import get_storage
from service.storage import ArtifactMissing, FileSink, UnsafePath

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/files", tags=["files"], responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})

PURPOSES = ("fine-tune",)
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "a JSONL dataset"},
                        "purpose": {"type": "string", "enum": list(PURPOSES)},
                    },
                }
            }
        },
    }
}


def get_file(session: SessionDep, tenant_id: str, file_id: str, param: str | None = None) -> File:
    """A live (not deleted) file of this tenant, or 404."""
    f = session.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id, File.deleted_at.is_(None)))
    if f is None:
        raise not_found("File", file_id, param=param)
    return f


@router.post("", response_model=FileObject, openapi_extra=_UPLOAD_BODY,
             responses={413: {"model": ErrorResponse}})
async def create_file(request: Request, principal: PrincipalDep, session: SessionDep, settings: SettingsDep) -> FileObject:
    """Upload a JSONL dataset (`purpose=fine-tune`)."""
    file_id = new_id("file")
    storage = get_storage(settings)
    # The upload is spooled to a temp file while counted and hashed, validated there, then
    # published (service/objectstore.py: with S3 a multipart upload from that file, never in memory).
    sink = FileSink(settings.files_dir, principal.tenant_id, file_id, settings.max_upload_bytes)
    upload = await receive_upload(request, sink)
    stored = upload.stored
    try:
        purpose = upload.fields.get("purpose")
        if purpose is None:
            raise bad_request("Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter")
        if purpose not in PURPOSES:
            raise bad_request(f"Invalid value for 'purpose': {purpose!r}; this service accepts only 'fine-tune'.",
                              param="purpose", code="invalid_value")
        report = await run_in_threadpool(validate_jsonl, stored.path)
        if not report.ok:
            detail = report.summary() if (report.problems or report.n_problems) else "the file holds no examples"
            raise APIError(400, f"Invalid file format: {detail}", param="file", code="invalid_file_format")
        fmt = max(report.formats, key=report.formats.get) if report.formats else None  # type: ignore[arg-type]
        row = File(id=file_id, tenant_id=principal.tenant_id, filename=upload.filename[:512] or "upload.jsonl",
                   purpose=purpose, bytes=stored.bytes, sha256=stored.sha256, storage_path=stored.rel_path,
                   status="processed", n_examples=report.n_examples, data_format=fmt)

        def _insert() -> None:
            storage.publish_file("files", stored.rel_path)  # in the store before its row names it
            session.add(row)
            session.commit()
            storage.drop_local("files", stored.rel_path)  # with S3: the API keeps no copy

        await run_in_threadpool(_insert)
    except BaseException:
        await run_in_threadpool(storage.delete, "files", stored.rel_path)
        raise
    log.info("stored %s (%d bytes, %d examples) for %s", file_id, stored.bytes, report.n_examples, principal.tenant_id)
    return FileObject.from_row(row)


@router.get("", response_model=FileList)
def list_files(
    principal: PrincipalDep,
    session: SessionDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
    purpose: Annotated[str | None, Query(max_length=32)] = None,
) -> FileList:
    """List this tenant's files, newest first by default."""
    stmt = select(File).where(File.tenant_id == principal.tenant_id, File.deleted_at.is_(None))
    if purpose:
        stmt = stmt.where(File.purpose == purpose)
    rows, has_more = paginate(session, stmt, File, after, limit, newest_first=order == "desc")
    data = [FileObject.from_row(f) for f in rows]
    return FileList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, principal: PrincipalDep, session: SessionDep) -> FileObject:
    return FileObject.from_row(get_file(session, principal.tenant_id, file_id))


@router.get("/{file_id}/content", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                                         "text/csv": {"schema": {"type": "string"}}}}})
def retrieve_file_content(file_id: str, principal: PrincipalDep, session: SessionDep, settings: SettingsDep) -> FileResponse:
    """The file's bytes: an upload exactly as uploaded, a job's results file as plain CSV."""
    f = get_file(session, principal.tenant_id, file_id)
    session.close()  # a long download must not hold a pooled connection
    if f.purpose == RESULTS_PURPOSE:  # OpenAI's is base64-encoded CSV; ours is the CSV itself (README)
        media_type, filename = "text/csv; charset=utf-8", f"{f.id}.csv"
    else:
        media_type, filename = "application/octet-stream", f"{f.id}.jsonl"
    try:
        return stored_file_response(get_storage(settings), "files", f.storage_path, media_type, filename)
    except (ArtifactMissing, UnsafePath):
        raise APIError(410, f"The content of {file_id} is no longer in the file store.",
                       code="file_content_missing") from None


@router.delete("/{file_id}", response_model=FileDeleted)
def delete(file_id: str, principal: PrincipalDep, session: SessionDep, settings: SettingsDep) -> FileDeleted:
    """Delete a file: the row is kept (jobs refer to it) and marked deleted; the bytes are removed."""
    f = get_file(session, principal.tenant_id, file_id)
    in_use = session.scalar(
        select(Job.id).where(Job.tenant_id == principal.tenant_id, Job.status.in_(ACTIVE_STATUSES),
                             (Job.training_file == f.id) | (Job.validation_file == f.id)).limit(1))
    if in_use is not None:
        raise bad_request(f"File {file_id} is used by unfinished job {in_use}; cancel the job or wait for it to finish.",
                          param="file_id", code="file_in_use")
    f.deleted_at = now()
    session.commit()
    get_storage(settings).delete("files", f.storage_path)
    return FileDeleted(id=f.id)
