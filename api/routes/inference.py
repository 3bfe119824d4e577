"""`POST /v1/chat/completions` and `POST /v1/completions`: OpenAI's inference endpoints, relayed.

The API never loads a model (STYLE.md: it never imports torch). A request is checked here
(api/inference_schemas.py), its `model` resolved for the caller's tenant to a base model and an
optional LoRA adapter directory, and the generation relayed to the inference server
(api/upstream.py), whose answer (OpenAI's `ChatCompletion` / `Completion`, or their chunks with
`stream: true`) the client gets unchanged.

`model` is one of:
- a base model id (the model store's, or a shared `models` row): no adapter;
- one of the tenant's fine-tuned models (`ft:...`, its job succeeded and the model is not
  deleted): the job's final adapter, on the job's base model, cached upstream under the job id;
- one of the tenant's `fine_tuned_model_checkpoint`s: that checkpoint's adapter, cached upstream
  under the checkpoint id.
Anything else, another tenant's model named exactly included, is OpenAI's 404 `model_not_found`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.errors import APIError
from api.inference_schemas import (ChatCompletionRequest, CompletionRequest, chat_generation,
                                   completion_generation)
from api.routes.models import find_base_model, fine_tuned_models
from api.schemas import ErrorResponse
from api.upstream import generate
from service.db import Checkpoint, Job
from service.objectstore import get_storage
from service.settings import Settings
from service.storage import ADAPTER_FILES, UnsafePath

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 410, 429, 502, 503, 504)}
_ANSWER = {"description": "OpenAI's object as JSON, or with `stream: true` its chunks as Server-Sent Events "
                          "ending with `data: [DONE]`",
           "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}}
router = APIRouter(tags=["inference"], responses={**_ERRORS, 200: _ANSWER})


@dataclass(frozen=True)
class Target:
    """What a `model` name resolves to: the base model, and the adapter on top (None: the base alone)."""

    base_model_id: str
    adapter: dict[str, str] | None  # {"key": a stable unique id, "path": the absolute adapter directory}


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist or you do not have access to it.", param="model",
                    code="model_not_found")


def _adapter(settings: Settings, key: str, rel: str, name: str) -> dict[str, str]:
    """The adapter `rel` (its place in the artifact store, as the database records it) as the upstream gets it.

    The inference server fetches it from the store itself (service/objectstore.py), so the API
    only checks that the store still holds it.
    """
    try:
        storage = get_storage(settings)
        found = all(storage.exists("artifacts", f"{rel}/{file}") for file in ADAPTER_FILES)
    except UnsafePath:
        found = False
    if not found:
        raise APIError(410, f"The adapter files of model `{name}` are no longer available on this server.",
                       param="model", code="artifact_missing")
    return {"key": key, "path": rel}


def resolve_model(session: Session, settings: Settings, tenant_id: str, name: str) -> Target:
    """Resolve `name` for `tenant_id` (see the module docstring), then release the database connection.

    Raises:
        APIError: 404 `model_not_found`; 410 `artifact_missing` when the adapter's files are gone.
    """
    try:
        row = session.execute(fine_tuned_models(tenant_id, name)).tuples().first()
        if row is not None:
            _, job = row
            if not job.adapter_path:  # deleted (service/db.py, Job.adapter_path)
                raise model_not_found(name)
            return Target(job.model, _adapter(settings, job.id, job.adapter_path, name))
        # Checkpoint names are not unique in the schema (only per job and step): the newest wins.
        ckpt = session.execute(
            select(Checkpoint, Job).join(Job, Job.id == Checkpoint.job_id)
            .where(Checkpoint.fine_tuned_model_checkpoint == name, Checkpoint.tenant_id == tenant_id,
                   Job.tenant_id == tenant_id)
            .order_by(Checkpoint.seq.desc())).tuples().first()
        if ckpt is not None:
            c, job = ckpt
            return Target(job.model, _adapter(settings, c.id, c.adapter_path, name))
        if find_base_model(session, settings, name) is not None:
            return Target(name, None)
        raise model_not_found(name)
    finally:
        # A stream may last minutes: it must not hold a pooled connection (and a read transaction).
        session.close()


def _payload(kind: str, model: str, generation: dict[str, Any], target: Target) -> dict[str, Any]:
    """The inference server's `/internal/generate` body."""
    return {"kind": kind, "model": model, **generation, "base_model_id": target.base_model_id,
            "adapter": target.adapter}


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(req: ChatCompletionRequest, principal: PrincipalDep, session: SessionDep,
                                 settings: SettingsDep) -> Response:
    """OpenAI's chat completion on a base model, or a fine-tuned model or checkpoint of this tenant.

    Text only: a message is `system`, `developer`, `user` or `assistant` with string content or
    text parts; tools, logprobs, penalties, audio and other inputs are refused with a 400 naming
    the parameter. 503 `inference_unavailable` when no inference server is reachable.
    """
    generation = chat_generation(req)
    target = await run_in_threadpool(resolve_model, session, settings, principal.tenant_id, req.model)
    return await generate(settings, _payload("chat", req.model, generation, target))


@router.post("/v1/completions", response_model=None)
async def create_completion(req: CompletionRequest, principal: PrincipalDep, session: SessionDep,
                            settings: SettingsDep) -> Response:
    """OpenAI's (legacy) text completion: `prompt` a string or a list of strings, no token ids.

    `echo`, `best_of` > 1, `suffix`, `logprobs`, penalties and `logit_bias` are refused with a 400
    naming the parameter. 503 `inference_unavailable` when no inference server is reachable.
    """
    generation = completion_generation(req)
    target = await run_in_threadpool(resolve_model, session, settings, principal.tenant_id, req.model)
    return await generate(settings, _payload("completion", req.model, generation, target))
