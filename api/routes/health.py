"""Operations: `/healthz` (the process answers) and `/readyz` (database and broker reachable)."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep
from service import queue
from service.database import get_engine

log = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (no dependency is checked)."""
    return {"status": "ok"}


def _database_ok(url: str) -> bool:
    try:
        with get_engine(url).connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except DBAPIError as e:
        log.warning("readiness: database unreachable: %s", e.orig)
        return False


@router.get("/readyz", responses={503: {"description": "a dependency is unreachable"}})
async def readyz(settings: SettingsDep) -> JSONResponse:
    """Ready when a `SELECT 1` succeeds and the Celery broker accepts a connection; 503 otherwise."""
    db = await run_in_threadpool(_database_ok, settings.database_url)
    broker = await run_in_threadpool(queue.broker_reachable, 2.0)
    checks = {"database": "ok" if db else "unreachable", "broker": "ok" if broker else "unreachable"}
    if db and broker:
        return JSONResponse({"status": "ok", "checks": checks})
    failed = ", ".join(k for k, v in checks.items() if v != "ok")
    body = {"status": "unavailable", "checks": checks,
            "error": {"message": f"Not ready: {failed} unreachable.", "type": "server_error", "param": None,
                      "code": "not_ready"}}
    return JSONResponse(body, status_code=503)
