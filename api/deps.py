"""Request dependencies, as `Annotated` aliases (FastAPI full-stack template style).

`SessionDep` gives a database session per request; `PrincipalDep` authenticates the bearer key,
applies the per-key rate limit (api/ratelimit.py) and yields the tenant every query is scoped to.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import APIError
from service.database import session_factory
from service.keys import InvalidApiKey, authenticate
from service.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="An API key from `qlora keys create`")


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    session = session_factory(settings.database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant every object belongs to and the key used."""

    tenant_id: str
    key_id: str


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def get_principal(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Authenticate `Authorization: Bearer KEY` and count the request against the key's rate limit.

    Raises:
        APIError: 401 for a missing, unknown or revoked key; 429 past the rate limit.
    """
    if credentials is None or not credentials.credentials:
        raise _unauthorized(
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    try:
        tenant_id, key_id = authenticate(session, credentials.credentials)
    except InvalidApiKey as e:
        shown = credentials.credentials[:12] + "..." if len(credentials.credentials) > 12 else "***"
        raise _unauthorized(f"Incorrect API key provided: {shown} ({e}).") from None
    wait = request.app.state.rate_limiter.hit(key_id)
    if wait is not None:
        raise APIError(
            429,
            f"Rate limit reached: {request.app.state.rate_limiter.limit} requests per minute for this API key. "
            f"Please try again in {wait:.1f}s.",
            type="requests",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, int(wait + 0.999)))},
        )
    return Principal(tenant_id=tenant_id, key_id=key_id)


PrincipalDep = Annotated[Principal, Depends(get_principal)]
