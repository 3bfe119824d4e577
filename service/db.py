"""Database models: the one source of truth for tenants, keys, files, jobs, events, checkpoints
and models, and for where every artifact lives.

SQLAlchemy 2 typed mappings; the same Alembic migrations build this schema on SQLite and
PostgreSQL. Public ids are OpenAI-style strings (`file-…`, `ftjob-…`); every table also has an
integer `seq` that orders rows for cursor pagination (`after=<id>`). Timestamps are integer Unix
seconds, as on OpenAI's wire format.
"""

from __future__ import annotations

import secrets
import string
import time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, n: int = 24) -> str:
    """An unguessable public id such as `ftjob-3kq…` (24 random alphanumerics, ~143 bits)."""
    return prefix + "-" + "".join(secrets.choice(_ALPHABET) for _ in range(n))


def now() -> int:
    return int(time.time())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # org-…
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class ApiKey(Base):
    """An API key, stored as a SHA-256 hash; `prefix` finds the row, the hash is compared in constant time."""

    __tablename__ = "api_keys"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # key-…
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


# The purpose of the CSV a succeeded job leaves (OpenAI's `result_files`); uploads are "fine-tune".
RESULTS_PURPOSE = "fine-tune-results"


class File(Base):
    """An upload (purpose "fine-tune", JSONL) or a job's results CSV (RESULTS_PURPOSE, written by the worker)."""

    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # file-…
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    filename: Mapped[str] = mapped_column(String(512))  # as the client sent it; never a path
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_path: Mapped[str] = mapped_column(Text)  # relative to files_dir
    status: Mapped[str] = mapped_column(String(32), default="processed")
    n_examples: Mapped[int] = mapped_column(Integer, default=0)
    data_format: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    deleted_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Model(Base):
    """A model the API lists: a base model (tenant_id NULL, shared) or a tenant's fine-tuned model.

    A fine-tuned model's row is written with its job's `succeeded` status and deleted by
    `DELETE /v1/models/{id}`; the job row stays.
    """

    __tablename__ = "models"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(256), unique=True, index=True)
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id"), nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(16))  # base | fine_tuned
    base_model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    artifact_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    owned_by: Mapped[str] = mapped_column(String(128), default="system")
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


# A job's status, OpenAI's values: the ones a worker may still move, and the ones nothing changes.
ACTIVE_STATUSES = ("validating_files", "queued", "running")
FINISHED_STATUSES = ("succeeded", "failed", "cancelled")


class Job(Base):
    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # ftjob-…
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    api_key_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    model: Mapped[str] = mapped_column(String(256))  # the base model trained on (see requested_model)
    # A job continuing a fine-tuned model (migration 0006): the name the client gave (the API's
    # `model`), its adapter in the artifact store (the starting weights; DPO's reference), its job.
    requested_model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    init_adapter: Mapped[str | None] = mapped_column(Text, nullable=True)
    parent_job_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(32), index=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)  # as requested ("auto" kept)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # resolved TrainConfig.to_dict()
    method: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    estimated_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The final adapter, relative to artifacts_dir. Set with `succeeded`; NULL again on a succeeded
    # job once its fine-tuned model was deleted (the files are gone too).
    adapter_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    # OpenAI's `result_files`: the id of the job's results CSV, set with `succeeded` (worker/results.py).
    result_files: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    # Note: merged export. The merged 16-bit model of a succeeded job (GET .../merged) is built on
    # request by a worker (worker/export.py) into artifacts_dir/jobs/<id>/merged.tar.gz. This records
    # the request: NULL (never asked), or {"status": "building" | "succeeded" | "failed",
    # "request_id", "requested_at", "attempts", "build_starts", "error": {"code", "message"} | None,
    # "finished_at"}. Every write is an UPDATE guarded by the `request_id` it read: of two polls at
    # once only one sends a message, and a worker never overwrites a newer request. The archive on
    # disk, renamed into place whole, is what is served.
    merged_export: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cancel_requested_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Note: job lease. One worker at a time holds a job; it renews `lease_expires_at` on every
    # heartbeat. A redelivered Celery message for a job whose lease is live does nothing; an
    # expired lease may be taken over (see worker/lease.py).
    lease_owner: Mapped[str | None] = mapped_column(String(256), nullable=True)
    lease_expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # When the job's final status was turned into webhook deliveries (See Note: webhook outbox in
    # service/webhooks.py); NULL while it is unfinished or not yet announced.
    webhooks_emitted_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "dedup_key", name="uq_job_events_dedup"),)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # ftevent-…
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # "metrics:<step>" for metrics events: the unique constraint makes a replayed step a no-op.
    dedup_key: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step_number", name="uq_checkpoints_step"),)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # ftckpt-…
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(256))
    adapter_path: Mapped[str] = mapped_column(Text)  # relative to artifacts_dir
    state_path: Mapped[str | None] = mapped_column(Text, nullable=True)  # full resumable state
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Worker(Base):
    """A worker process as it last reported itself: what device it has and how much memory."""

    __tablename__ = "workers"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(256), unique=True, index=True)  # celery hostname
    device: Mapped[str] = mapped_column(String(256))
    device_memory_bytes: Mapped[int] = mapped_column(BigInteger)
    # what `compute_dtype: "auto"` resolves to on this device (qlora_core.device); None: not reported
    compute_dtype: Mapped[str | None] = mapped_column(String(16), nullable=True)
    started_at: Mapped[int] = mapped_column(BigInteger, default=now)
    last_seen_at: Mapped[int] = mapped_column(BigInteger, default=now)
    current_job: Mapped[str | None] = mapped_column(String(64), nullable=True)
    alive: Mapped[bool] = mapped_column(Boolean, default=True)


class WebhookEndpoint(Base):
    """A tenant's webhook receiver. The secret is kept as issued: signing needs it (unlike API keys,
    which are only ever compared and so are stored hashed)."""

    __tablename__ = "webhook_endpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # we-…
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[Any]] = mapped_column(JSON)  # event types it receives
    secret: Mapped[str] = mapped_column(String(128))  # whsec_…
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    deleted_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class WebhookDelivery(Base):
    """One event for one endpoint, in the outbox until delivered (See Note: webhook outbox)."""

    __tablename__ = "webhook_deliveries"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # msg-…: the `webhook-id` header
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    event_id: Mapped[str] = mapped_column(String(64))  # evt_…, the payload's `id`
    type: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    payload: Mapped[str] = mapped_column(Text)  # the exact body sent, every try the same bytes
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed | dropped
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[int] = mapped_column(BigInteger, default=now)
    locked_until: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    delivered_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


Index("ix_jobs_tenant_seq", Job.tenant_id, Job.seq)
Index("ix_webhook_deliveries_due", WebhookDelivery.status, WebhookDelivery.next_attempt_at)
Index("ix_events_job_seq", JobEvent.job_id, JobEvent.seq)
