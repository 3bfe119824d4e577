"""`/v1/webhooks`: a tenant's webhook endpoints (an extension: OpenAI configures them in its dashboard).

`POST` registers a URL and answers the endpoint with its `whsec_` secret, the only time the secret
is shown; `GET` lists the tenant's endpoints without secrets; `DELETE` removes one, and its
undelivered events are dropped. What is sent, and how, is service/webhooks.py.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body
from sqlalchemy import select, update

from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.errors import bad_request, not_found
from api.schemas import ErrorResponse, WebhookCreate, WebhookDeleted, WebhookEndpointList, WebhookEndpointObject
from service.db import WebhookDelivery, WebhookEndpoint, now
from service.webhooks import InvalidWebhookUrl, WebhookRefused, register_endpoint

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"],
                   responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse},
                              404: {"model": ErrorResponse}})


@router.post("", response_model=WebhookEndpointObject)
def create_webhook(req: Annotated[WebhookCreate, Body()], principal: PrincipalDep, session: SessionDep,
                   settings: SettingsDep) -> WebhookEndpointObject:
    """Register an endpoint for `fine_tuning.job.succeeded`, `.failed` and `.cancelled` (or the `events` given)."""
    try:
        row = register_endpoint(session, principal.tenant_id, req.url, req.events, settings.webhook_allow_insecure)
    except InvalidWebhookUrl as e:
        raise bad_request(f"Invalid 'url': {e}.", param="url", code="invalid_url") from e
    except WebhookRefused as e:
        raise bad_request(f"Invalid '{e.param}': {e}.", param=e.param, code="invalid_value") from e
    session.commit()
    return WebhookEndpointObject.from_row(row, with_secret=True)


@router.get("", response_model=WebhookEndpointList)
def list_webhooks(principal: PrincipalDep, session: SessionDep) -> WebhookEndpointList:
    rows = session.scalars(select(WebhookEndpoint).where(
        WebhookEndpoint.tenant_id == principal.tenant_id, WebhookEndpoint.deleted_at.is_(None))
        .order_by(WebhookEndpoint.seq.desc())).all()
    return WebhookEndpointList(data=[WebhookEndpointObject.from_row(r) for r in rows])


@router.delete("/{webhook_id}", response_model=WebhookDeleted)
def delete_webhook(webhook_id: str, principal: PrincipalDep, session: SessionDep) -> WebhookDeleted:
    row = session.scalar(select(WebhookEndpoint).where(
        WebhookEndpoint.id == webhook_id, WebhookEndpoint.tenant_id == principal.tenant_id,
        WebhookEndpoint.deleted_at.is_(None)))
    if row is None:
        raise not_found("webhook endpoint", webhook_id)
    row.deleted_at = now()
    session.execute(update(WebhookDelivery).where(WebhookDelivery.endpoint_id == row.id,
                                                  WebhookDelivery.status == "pending")
                    .values(status="dropped", last_error="the endpoint was deleted"))
    session.commit()
    return WebhookDeleted(id=row.id)
