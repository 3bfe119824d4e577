"""`/v1/models`: the base models (owned by "system") and this tenant's fine-tuned models (OpenAI's `Model`).

A fine-tuned model is listed while its `models` row (written by the worker together with the job's
`succeeded` status) exists and its job succeeded; `created` is the job's `finished_at`, as on
OpenAI. `DELETE /v1/models/{id}` removes a fine-tuned model as OpenAI does: the model row and the
final adapter on disk go (with its merged model, if one was built), the job stays (its
`fine_tuned_model` still names the model) and so do its checkpoints, which are separate files and
separate `fine_tuned_model_checkpoint`s; the
inference server is then told to drop the adapter from its cache (api/upstream.py). Base models
live in the model store and are managed on the server with `qlora models`, never through the API.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from sqlalchemy import Select, delete, null, select, update
from starlette.concurrency import run_in_threadpool

from api.basemodels import base_model, list_base_models
from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.errors import APIError, not_found
from api.schemas import ErrorResponse, ModelDeleted, ModelList, ModelObject
from api.upstream import evict
from service.db import ACTIVE_STATUSES, Job, Model
from service.objectstore import get_storage
from service.storage import delete_adapter, job_archive_rel, merged_archive_rel

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/models", tags=["models"],
                   responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})


def fine_tuned_models(tenant_id: str, model_id: str | None = None) -> Select[tuple[Model, Job]]:
    """(Model, Job) rows of this tenant's fine-tuned models whose job succeeded, oldest first."""
    stmt = (select(Model, Job).join(Job, Job.id == Model.job_id)
            .where(Model.tenant_id == tenant_id, Model.kind == "fine_tuned",
                   Job.tenant_id == tenant_id, Job.status == "succeeded")
            .order_by(Job.finished_at, Model.seq))
    return stmt if model_id is None else stmt.where(Model.id == model_id)


def _fine_tuned_object(m: Model, job: Job) -> ModelObject:
    created = job.finished_at if job.finished_at is not None else m.created_at
    return ModelObject(id=m.id, created=created, owned_by=job.tenant_id)


def _db_models(session: SessionDep, tenant_id: str) -> list[ModelObject]:
    shared = session.scalars(select(Model).where(Model.tenant_id.is_(None)).order_by(Model.seq))
    own = session.execute(fine_tuned_models(tenant_id)).tuples()
    return ([ModelObject(id=m.id, created=m.created_at, owned_by=m.owned_by or "system") for m in shared]
            + [_fine_tuned_object(m, job) for m, job in own])


def find_base_model(session: SessionDep, settings: SettingsDep, model_id: str) -> ModelObject | None:
    """The base model `model_id` (the store's, or a shared row), or None."""
    found = base_model(get_storage(settings), model_id)
    if found is not None:
        return ModelObject(id=found["id"], created=found["created"], owned_by="system")
    row = session.scalar(select(Model).where(Model.id == model_id, Model.tenant_id.is_(None)))
    return None if row is None else ModelObject(id=row.id, created=row.created_at, owned_by=row.owned_by or "system")


@router.get("", response_model=ModelList)
async def list_models(principal: PrincipalDep, session: SessionDep, settings: SettingsDep) -> ModelList:
    """Base models first (by id), then this tenant's fine-tuned models (oldest first)."""
    base = await run_in_threadpool(list_base_models, get_storage(settings))
    models = {m["id"]: ModelObject(id=m["id"], created=m["created"], owned_by="system") for m in base}
    for m in await run_in_threadpool(_db_models, session, principal.tenant_id):
        models.setdefault(m.id, m)
    return ModelList(data=list(models.values()))


@router.get("/{model_id:path}", response_model=ModelObject)
def retrieve_model(model_id: str, principal: PrincipalDep, session: SessionDep, settings: SettingsDep) -> ModelObject:
    """A base model or one of this tenant's fine-tuned models; another tenant's is a 404."""
    row = session.execute(fine_tuned_models(principal.tenant_id, model_id)).tuples().first()
    if row is not None:
        return _fine_tuned_object(*row)
    found = find_base_model(session, settings, model_id)
    if found is None:
        raise not_found("model", model_id, param="model")
    return found


@router.delete("/{model_id:path}", response_model=ModelDeleted, responses={403: {"model": ErrorResponse}})
def delete_model(model_id: str, principal: PrincipalDep, session: SessionDep, settings: SettingsDep) -> ModelDeleted:
    """Delete one of this tenant's fine-tuned models and its final adapter files.

    The job is kept (OpenAI keeps it; its `fine_tuned_model` still names the model) and its adapter
    download answers 410 `model_deleted` from then on. Checkpoints and their adapters are kept.

    Raises:
        APIError: 404 `model_not_found` for an unknown, deleted or other tenant's model; 403
            `model_not_deletable` for a base model; 400 `model_in_use` while an unfinished job
            continues the model.
    """
    row = session.execute(fine_tuned_models(principal.tenant_id, model_id)).tuples().first()
    if row is None:
        if find_base_model(session, settings, model_id) is not None:
            raise APIError(403, f"Model {model_id!r} is a base model; base models cannot be deleted through the API "
                           "(they are managed on the server with `qlora models`).", param="model",
                           code="model_not_deletable")
        raise not_found("model", model_id, param="model")
    m, job = row
    ft, job_id = m.id, job.id
    user = session.scalar(select(Job.id).where(Job.parent_job_id == job_id, Job.tenant_id == principal.tenant_id,
                                               Job.status.in_(ACTIVE_STATUSES)).limit(1))
    if user is not None:  # its adapter is that job's starting point (and a DPO job's reference)
        raise APIError(400, f"Model {ft} is being trained on by unfinished job {user}; cancel the job or wait for "
                       "it to finish.", param="model", code="model_in_use")
    paths = {p for p in (job.adapter_path, m.artifact_path) if p}
    # The row goes first (a concurrent delete then finds nothing: 404), the files next, and the
    # commit last: a 200 means the files are gone, and a failed removal rolls the row back so the
    # model is still listed and the delete can be retried.
    if session.execute(delete(Model).where(Model.id == ft, Model.tenant_id == principal.tenant_id)).rowcount != 1:
        raise not_found("model", model_id, param="model")
    # Nothing points at the removed files any more; a succeeded job without an adapter_path is
    # one whose model was deleted (service/db.py, Job.adapter_path). The merged model goes too: it
    # is the same weights (a build still running removes its archive when it sees this).
    session.execute(update(Job).where(Job.id == job_id).values(adapter_path=None, merged_export=null()))
    delete_adapter(settings.artifacts_dir, paths, job_archive_rel(job_id), derived_rels=[merged_archive_rel(job_id)])
    storage = get_storage(settings)
    if storage.remote:  # the store's copies too, archives first (as delete_adapter does on disk)
        for rel in (job_archive_rel(job_id), merged_archive_rel(job_id)):
            storage.delete("artifacts", rel)
        for rel in sorted(paths):
            storage.delete_tree("artifacts", rel, flat=True)
    session.commit()
    log.info("deleted fine-tuned model %s of job %s for %s", ft, job_id, principal.tenant_id)
    evict(settings, job_id)  # the inference server's adapter key of a fine-tuned model (api/routes/inference.py)
    return ModelDeleted(id=ft)
