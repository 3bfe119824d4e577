"""Request and response schemas, apart from the ORM models; the shapes are OpenAI's.

Field names and types follow `openai/openai-openapi` (`OpenAIFile`, `FineTuningJob`,
`FineTuningJobEvent`, `FineTuningJobCheckpoint`, `Model`, list envelopes), so the official SDK
parses every response unchanged. Our additions (`qlora`, `progress`, ...) are extra fields the
SDK keeps and ignores.
"""

from __future__ import annotations

import typing
from dataclasses import fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from qlora_core.config import TrainConfig
from service.db import Checkpoint, File, Job, JobEvent

# learning_rate_multiplier multiplies this: the QLoRA paper's learning rate.
BASE_LEARNING_RATE = 2e-4

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- files -----------------------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None
    expires_at: int | None = None

    @classmethod
    def from_row(cls, f: File) -> "FileObject":
        return cls(
            id=f.id, bytes=f.bytes, created_at=f.created_at, filename=f.filename, purpose=f.purpose, status=f.status
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# --- jobs: request ---------------------------------------------------------------------------


class Hyperparameters(BaseModel):
    """OpenAI's hyperparameters; each may be "auto" (see api/jobspec.py for how auto resolves)."""

    model_config = ConfigDict(extra="forbid")
    n_epochs: Literal["auto"] | int | None = "auto"
    batch_size: Literal["auto"] | int | None = "auto"
    learning_rate_multiplier: Literal["auto"] | float | None = "auto"


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class DpoHyperparameters(Hyperparameters):
    """OpenAI's DPO hyperparameters: the supervised three plus `beta` (auto: 0.1)."""

    beta: Literal["auto"] | float | None = "auto"


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    """OpenAI's `method`: `{"type": "supervised" | "dpo", "<type>": {"hyperparameters": {...}}}`."""

    model_config = ConfigDict(extra="allow")  # "reinforcement" and future types: refused by name in api/jobspec.py
    type: str = "supervised"
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


# OpenAI's hyperparameters and `seed` own these TrainConfig fields; `qlora` holds the rest.
QLORA_EXCLUDED = ("n_epochs", "batch_size", "seed", "method", "dpo_beta")


def _qlora_options_model() -> type[BaseModel]:
    hints = typing.get_type_hints(TrainConfig)
    field_defs: dict[str, Any] = {
        f.name: (hints[f.name] | None, Field(default=None, description=f"default {f.default!r}"))
        for f in fields(TrainConfig)
        if f.name not in QLORA_EXCLUDED
    }
    return create_model(
        "QloraOptions",
        __config__=ConfigDict(extra="forbid"),
        __doc__="Our extension: the QLoRA/LoRA training options (qlora_core.config.TrainConfig).",
        **field_defs,
    )


QloraOptions = _qlora_options_model()


class JobCreate(BaseModel):
    """`POST /v1/fine_tuning/jobs`: OpenAI's fields plus the `qlora` extension object."""

    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, Any] | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    integrations: list[dict[str, Any]] | None = None
    qlora: QloraOptions | None = None  # type: ignore[valid-type]


# --- jobs: response --------------------------------------------------------------------------


class JobError(BaseModel):
    code: str | None = None
    message: str
    param: str | None = None


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    model: str
    training_file: str
    validation_file: str | None
    status: JobStatus
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any] | None  # supervised jobs only (OpenAI: deprecated in favour of method)
    method: dict[str, Any] | None
    organization_id: str
    result_files: list[str] = []  # a succeeded job's `fine-tune-results` CSV (worker/results.py)
    seed: int
    trained_tokens: int | None
    estimated_finish: int | None
    integrations: list[dict[str, Any]] = []
    metadata: dict[str, str] | None
    user_provided_suffix: str | None = None
    qlora: dict[str, Any] = Field(description="the resolved training configuration (extension)")
    progress: dict[str, Any] | None = None
    estimated_memory_bytes: int | None = None

    @classmethod
    def from_row(cls, j: Job) -> "JobObject":
        cfg = j.config or {}
        hp = resolved_hyperparameters(cfg)
        err = j.error if j.error and j.error.get("message") else None
        is_dpo = (j.method or {}).get("type") == "dpo"
        return cls(
            id=j.id,
            created_at=j.created_at,
            model=j.requested_model or j.model,
            training_file=j.training_file,
            validation_file=j.validation_file,
            status=j.status,  # type: ignore[arg-type]
            error=JobError(**err) if err else None,
            fine_tuned_model=j.fine_tuned_model,
            finished_at=j.finished_at,
            hyperparameters=None if is_dpo else hp,
            method=j.method or {"type": "supervised", "supervised": {"hyperparameters": hp}},
            organization_id=j.tenant_id,
            result_files=list(j.result_files or []),
            seed=j.seed,
            trained_tokens=j.trained_tokens,
            estimated_finish=j.estimated_finish,
            metadata=j.user_metadata,
            user_provided_suffix=j.suffix,
            qlora=cfg,
            progress=j.progress,
            estimated_memory_bytes=j.estimated_memory_bytes,
        )


class EstimateWorker(BaseModel):
    device: str
    device_memory_bytes: int
    compute_dtype: str | None


class JobEstimate(BaseModel):
    """`POST /v1/fine_tuning/jobs/estimate`: a job request checked, not created (extension)."""

    object: Literal["fine_tuning.job.estimate"] = "fine_tuning.job.estimate"
    estimated_memory_bytes: int | None = Field(description="peak training memory; null when the model's shape is unknown")
    hyperparameters: dict[str, Any]
    qlora: dict[str, Any] = Field(description="the resolved training configuration")
    workers: list[EstimateWorker] = Field(description="live workers, most device memory first")


def resolved_hyperparameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's three hyperparameters as resolved into a TrainConfig dict."""
    lr = cfg.get("learning_rate", BASE_LEARNING_RATE)
    return {
        "batch_size": cfg.get("batch_size"),
        "learning_rate_multiplier": round(lr / BASE_LEARNING_RATE, 10),
        "n_epochs": cfg.get("n_epochs"),
    }


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobObject]
    has_more: bool


class JobEventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, e: JobEvent) -> "JobEventObject":
        level = e.level if e.level in ("info", "warn", "error") else ("warn" if e.level == "warning" else "info")
        return cls(id=e.id, created_at=e.created_at, level=level, message=e.message,
                   type="metrics" if e.type == "metrics" else "message", data=e.data)  # type: ignore[arg-type]


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventObject]
    has_more: bool


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]

    @classmethod
    def from_row(cls, c: Checkpoint) -> "CheckpointObject":
        return cls(id=c.id, created_at=c.created_at, fine_tuned_model_checkpoint=c.fine_tuned_model_checkpoint,
                   fine_tuning_job_id=c.job_id, step_number=c.step_number, metrics=c.metrics or {})


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class MergedExportPending(BaseModel):
    """202 from `GET .../merged` while a worker builds the archive (our extension, not OpenAI's)."""

    object: Literal["fine_tuning.job.merged_export"] = "fine_tuning.job.merged_export"
    fine_tuning_job_id: str
    status: Literal["building"] = "building"
    requested_at: int
    retry_after: int  # seconds, as in the Retry-After header
    message: str


# --- models ----------------------------------------------------------------------------------


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


# --- webhooks (extension) ----------------------------------------------------------------------


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=2048)
    events: list[str] | None = Field(default=None, description="default: all three job events")


class WebhookEndpointObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    created_at: int
    secret: str | None = Field(default=None, description="`whsec_...`: only in the answer to POST")

    @classmethod
    def from_row(cls, w: Any, with_secret: bool = False) -> "WebhookEndpointObject":
        return cls(id=w.id, url=w.url, events=list(w.events), created_at=w.created_at,
                   secret=w.secret if with_secret else None)


class WebhookEndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpointObject]
    has_more: bool = False


class WebhookDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    deleted: bool = True
