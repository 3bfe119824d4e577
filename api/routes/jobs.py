"""`/v1/fine_tuning/jobs`: create, list, retrieve and cancel fine-tuning jobs (OpenAI's API).

Creating a job validates everything a client can get wrong (model, files, hyperparameters, the
`qlora` options; api/jobspec.py), records the job with its resolved TrainConfig and status
`validating_files`, commits, and only then enqueues "train job X" (service.queue): the database
is the source of truth, and a message lost because the broker was down is re-sent by the
worker's reconciler. Cancellation is cooperative (REFERENCES.md "Celery for long GPU jobs").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import func, select, update

from api.basemodels import base_model
from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.errors import APIError, bad_request, not_found
from api.fitcheck import check_fit, live_workers
from api.jobspec import check_metadata, hyperparameters_param, method_type, resolve_config
from api.routes.models import fine_tuned_models
from api.routes.pagination import paginate
from api.schemas import (ErrorResponse, EstimateWorker, JobCreate, JobEstimate, JobList, JobObject,
                         resolved_hyperparameters)
from qlora_core.validate import PREFERENCE_FORMAT
from service import queue
from service.db import ACTIVE_STATUSES, FINISHED_STATUSES, File, Job, JobEvent, new_id, now
from service.objectstore import get_storage

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"],
                   responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse},
                              404: {"model": ErrorResponse}, 429: {"model": ErrorResponse}})

MIN_TRAINING_EXAMPLES = 10


def get_job(session: SessionDep, tenant_id: str, job_id: str) -> Job:
    """A job of this tenant, or 404 (another tenant's job does not exist for this caller)."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise not_found("fine-tuning job", job_id)
    return job


def add_event(session: SessionDep, job_id: str, message: str, level: str = "info") -> None:
    session.add(JobEvent(id=new_id("ftevent"), job_id=job_id, level=level, type="message", message=message))


def _check_file(session: SessionDep, tenant_id: str, file_id: str, param: str) -> File:
    f = session.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id, File.deleted_at.is_(None)))
    if f is None:
        raise bad_request(f"Invalid file ID: {file_id} does not exist.", param=param, code="file_not_found")
    if f.purpose != "fine-tune":
        raise bad_request(f"File {file_id} has purpose {f.purpose!r}; fine-tuning needs purpose 'fine-tune'.",
                          param=param, code="invalid_file_purpose")
    return f


@dataclass(frozen=True)
class _Checked:
    """A job request that passed every check a client can fail."""

    config: dict[str, Any]
    requested: dict[str, Any]
    method: dict[str, Any]
    metadata: dict[str, str] | None
    estimated_memory_bytes: int | None
    base: str  # the base model trained on
    parent: Job | None  # the job of the fine-tuned model this job continues


def _parent_job(session: SessionDep, tenant_id: str, name: str) -> Job | None:
    """The succeeded job behind one of the tenant's fine-tuned models, or None (unknown, another tenant's, deleted)."""
    row = session.execute(fine_tuned_models(tenant_id, name)).tuples().first()
    if row is None or not row[1].adapter_path:
        return None
    return row[1]


def _check_format(f: File, kind: str, param: str) -> None:
    """A DPO job needs preference pairs, a supervised job supervised examples (qlora_core/validate.py)."""
    pairs = f.data_format == PREFERENCE_FORMAT
    if kind == "dpo" and not pairs:
        raise bad_request(f"File {f.id} holds supervised examples ({f.data_format} format), but method 'dpo' needs "
                          "preference pairs: lines of {\"input\": {\"messages\": [...]}, \"preferred_output\": [...], "
                          "\"non_preferred_output\": [...]}.", param=param, code="invalid_file_format")
    if kind == "supervised" and pairs:
        raise bad_request(f"File {f.id} holds preference pairs (the DPO format), but a supervised job needs "
                          "supervised examples (chat, prompt/completion, alpaca or text); use "
                          "method={\"type\": \"dpo\"} to train on pairs.", param=param, code="invalid_file_format")


def _check_request(req: JobCreate, principal: PrincipalDep, session: SessionDep, settings: SettingsDep) -> _Checked:
    """Everything `create_job` validates before it records anything (shared with `estimate_job`)."""
    base, parent = req.model, None
    if base_model(get_storage(settings), req.model) is None:
        parent = _parent_job(session, principal.tenant_id, req.model)
        if parent is None:
            raise APIError(400, f"Model {req.model!r} does not exist or is not available for fine-tuning. "
                           "GET /v1/models lists the base models and your fine-tuned models.", param="model",
                           code="model_not_found")
        base = parent.model  # See Note: continuing a fine-tuned model in api/jobspec.py
    kind = method_type(req)
    train = _check_file(session, principal.tenant_id, req.training_file, "training_file")
    _check_format(train, kind, "training_file")
    if train.n_examples < MIN_TRAINING_EXAMPLES:
        raise bad_request(f"Training file has {train.n_examples} example(s), but must have at least "
                          f"{MIN_TRAINING_EXAMPLES} examples", param="training_file", code="invalid_n_examples")
    if req.validation_file is not None:
        _check_format(_check_file(session, principal.tenant_id, req.validation_file, "validation_file"), kind,
                      "validation_file")
    metadata = check_metadata(req.metadata)
    config, requested, method = resolve_config(req, parent.config if parent is not None else None)
    # Refuse now what no worker can hold, rather than failing out of memory after the queue.
    estimated = check_fit(session, settings, base, config, hyperparameters_param(req))
    return _Checked(config, requested, method, metadata, estimated, base, parent)


@router.post("/estimate", response_model=JobEstimate)
def estimate_job(req: Annotated[JobCreate, Body()], principal: PrincipalDep, session: SessionDep,
                 settings: SettingsDep) -> JobEstimate:
    """Check a job request without creating it (an extension; the console calls it as the form changes).

    Answers what creating it would answer, short of recording it: the same 400s (a bad file, a
    value out of range, `insufficient_device_memory` when no live worker can hold it), or the
    resolved configuration with its peak-memory estimate and the live workers' devices.
    """
    checked = _check_request(req, principal, session, settings)
    workers = [EstimateWorker(device=w.device, device_memory_bytes=w.device_memory_bytes,
                              compute_dtype=w.compute_dtype) for w in live_workers(session, settings)]
    return JobEstimate(estimated_memory_bytes=checked.estimated_memory_bytes,
                       hyperparameters=resolved_hyperparameters(checked.config), qlora=checked.config,
                       workers=workers)


@router.post("", response_model=JobObject)
def create_job(req: Annotated[JobCreate, Body()], principal: PrincipalDep, session: SessionDep,
               settings: SettingsDep) -> JobObject:
    """Create a fine-tuning job; it starts as `validating_files` and is handed to a worker.

    A job whose estimated peak memory exceeds the largest live worker's device is refused with
    400 `insufficient_device_memory` (api/fitcheck.py).
    """
    checked = _check_request(req, principal, session, settings)
    config, requested, method = checked.config, checked.requested, checked.method
    metadata, estimated = checked.metadata, checked.estimated_memory_bytes

    unfinished = session.scalar(select(func.count()).select_from(Job).where(
        Job.api_key_id == principal.key_id, Job.status.in_(ACTIVE_STATUSES)))
    if unfinished is not None and unfinished >= settings.max_concurrent_jobs:
        raise APIError(429, f"This API key already has {unfinished} unfinished job(s), the limit is "
                       f"{settings.max_concurrent_jobs}; wait for one to finish or cancel one.",
                       type="requests", code="concurrent_jobs_limit")

    parent = checked.parent
    job = Job(id=new_id("ftjob"), tenant_id=principal.tenant_id, api_key_id=principal.key_id, model=checked.base,
              requested_model=req.model if parent is not None else None,
              init_adapter=parent.adapter_path if parent is not None else None,
              parent_job_id=parent.id if parent is not None else None,
              training_file=req.training_file, validation_file=req.validation_file, status="validating_files",
              suffix=req.suffix, seed=config["seed"], user_metadata=metadata, hyperparameters=requested,
              config=config, method=method, attempts=0,
              estimated_memory_bytes=estimated)
    session.add(job)
    session.flush()
    add_event(session, job.id, f"Created fine-tuning job: {job.id}")
    session.commit()
    try:
        queue.enqueue_job(job.id)
    except BrokerError as e:  # the reconciler re-enqueues jobs that no worker holds
        log.warning("could not enqueue %s now (%s); the reconciler will retry", job.id, e)
    else:
        job.enqueued_at = now()
        session.commit()
    log.info("created %s for %s on %s", job.id, principal.tenant_id, req.model)
    return JobObject.from_row(job)


@router.get("", response_model=JobList)
def list_jobs(
    principal: PrincipalDep,
    session: SessionDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    """This tenant's jobs, newest first."""
    stmt = select(Job).where(Job.tenant_id == principal.tenant_id)
    rows, has_more = paginate(session, stmt, Job, after, limit)
    return JobList(data=[JobObject.from_row(j) for j in rows], has_more=has_more)


@router.get("/{job_id}", response_model=JobObject)
def retrieve_job(job_id: str, principal: PrincipalDep, session: SessionDep) -> JobObject:
    return JobObject.from_row(get_job(session, principal.tenant_id, job_id))


@router.post("/{job_id}/cancel", response_model=JobObject)
def cancel_job(job_id: str, principal: PrincipalDep, session: SessionDep) -> JobObject:
    """Cancel a job.

    A job not yet running is cancelled at once. A running job keeps status `running` until its
    worker sees `cancel_requested_at` and stops at the next step, then becomes `cancelled`.
    Cancelling a cancelled job returns it unchanged; a succeeded or failed job cannot be
    cancelled (400 `job_not_cancellable`).
    """
    job = get_job(session, principal.tenant_id, job_id)
    if job.status == "cancelled":
        return JobObject.from_row(job)
    if job.status in FINISHED_STATUSES:
        raise bad_request(f"Job {job_id} has already {job.status} and cannot be cancelled.", param="fine_tuning_job_id",
                          code="job_not_cancellable")
    t = now()
    # One atomic UPDATE decides the race with a worker that is taking the job right now.
    done = session.execute(
        update(Job).where(Job.id == job.id, Job.status.in_(("validating_files", "queued")))
        .values(status="cancelled", cancel_requested_at=t, finished_at=t)
    ).rowcount
    if done:
        add_event(session, job.id, "Fine-tuning job cancelled")
    else:
        session.execute(update(Job).where(Job.id == job.id, Job.cancel_requested_at.is_(None))
                        .values(cancel_requested_at=t))
        add_event(session, job.id, "Cancellation requested; the job stops at its next training step")
    session.commit()
    session.refresh(job)
    return JobObject.from_row(job)
