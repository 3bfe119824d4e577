"""`/v1/models`: the base models (owned by "system") and this tenant's fine-tuned models."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import or_, select
from starlette.concurrency import run_in_threadpool

from api.basemodels import list_base_models
from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.errors import not_found
from api.schemas import ErrorResponse, ModelList, ModelObject
from service.db import Model

router = APIRouter(prefix="/v1/models", tags=["models"],
                   responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})


def _db_models(session: SessionDep, tenant_id: str) -> list[ModelObject]:
    rows = session.scalars(select(Model).where(or_(Model.tenant_id == tenant_id, Model.tenant_id.is_(None)))
                           .order_by(Model.seq))
    return [ModelObject(id=m.id, created=m.created_at, owned_by=tenant_id if m.tenant_id else m.owned_by or "system")
            for m in rows]


async def _all_models(session: SessionDep, settings: SettingsDep, tenant_id: str) -> list[ModelObject]:
    base = await run_in_threadpool(list_base_models, settings.models_dir)
    models = {m["id"]: ModelObject(id=m["id"], created=m["created"], owned_by="system") for m in base}
    for m in await run_in_threadpool(_db_models, session, tenant_id):
        models.setdefault(m.id, m)
    return list(models.values())


@router.get("", response_model=ModelList)
async def list_models(principal: PrincipalDep, session: SessionDep, settings: SettingsDep) -> ModelList:
    """Base models first (by id), then this tenant's fine-tuned models (oldest first)."""
    return ModelList(data=await _all_models(session, settings, principal.tenant_id))


@router.get("/{model_id:path}", response_model=ModelObject)
async def retrieve_model(model_id: str, principal: PrincipalDep, session: SessionDep,
                         settings: SettingsDep) -> ModelObject:
    for m in await _all_models(session, settings, principal.tenant_id):
        if m.id == model_id:
            return m
    raise not_found("model", model_id, param="model")
