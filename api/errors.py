"""Every error the API sends, in OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`.

Translation to HTTP happens here and only here (STYLE.md "Errors"): routes raise `APIError`, and
the handlers below turn FastAPI's request-validation errors (422 → 400 naming the param),
Starlette's 404/405, an unreachable database (503) and any unexpected fault (500) into the same
shape, so the `openai` SDK raises its usual `BadRequestError`, `NotFoundError`, ... classes.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger(__name__)

# Part of a validation error's `loc` that names a union member or a wrapper, not a field.
_LOC_NOISE = {"body", "query", "path", "header", "cookie", "int", "float", "str", "bool", "list", "dict"}


class APIError(Exception):
    """An error for the client, with its HTTP status and OpenAI-style fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers


def not_found(kind: str, object_id: str, param: str | None = None) -> APIError:
    """404 for an object that does not exist *for this tenant* (another tenant's is the same)."""
    return APIError(404, f"No such {kind}: {object_id}", param=param, code=f"{kind.lower().replace(' ', '_')}_not_found")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def error_body(message: str, type: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _json(status: int, message: str, type: str, param: str | None, code: str | None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if str(p) not in _LOC_NOISE and "[" not in str(p) and not isinstance(p, int)]
    return ".".join(parts) or None


def _validation_message(err: dict[str, Any], param: str | None) -> tuple[str, str]:
    kind = err.get("type", "")
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", "missing_required_parameter"
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", "unknown_parameter"
    if kind in ("json_invalid", "model_attributes_type", "dict_type") and not param:
        return "The request body is not a valid JSON object.", "invalid_json"
    return f"Invalid value for '{param}': {err.get('msg', 'invalid')}.", "invalid_value"


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return _json(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    param = _param_from_loc(tuple(first.get("loc", ())))
    message, code = _validation_message(first, param)
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more problem(s) in the request)"
    return _json(400, message, "invalid_request_error", param, code)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return _json(
            404,
            f"Unknown request URL: {request.method} {request.url.path}. Please check the URL for typos.",
            "invalid_request_error",
            None,
            "unknown_url",
        )
    if exc.status_code == 405:
        return _json(
            405,
            f"Method {request.method} is not allowed for {request.url.path}.",
            "invalid_request_error",
            None,
            "method_not_allowed",
            {**(getattr(exc, "headers", None) or {}), "Allow": _allowed_methods(request)},
        )
    type_ = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    code = "request_too_large" if exc.status_code == 413 else None  # api/bodylimit.py
    return _json(exc.status_code, str(exc.detail), type_, None, code, getattr(exc, "headers", None))


async def _database_unavailable(_: Request, exc: DBAPIError) -> JSONResponse:
    if isinstance(exc, OperationalError) or exc.connection_invalidated:
        log.error("database unavailable: %s", exc.orig)
        return _json(
            503,
            "The database is unavailable; please retry shortly.",
            "server_error",
            None,
            "database_unavailable",
            {"Retry-After": "5"},
        )
    log.exception("database error")
    return _json(500, "The server had an error while processing your request.", "server_error", None, "internal_error")


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return _json(500, "The server had an error while processing your request.", "server_error", None, "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the OpenAI envelope."""
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(DBAPIError, _database_unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
