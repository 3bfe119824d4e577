"""The FastAPI application: `create_app()` wires settings, routers, error handlers and the rate limiter.

`uvicorn --factory api.main:create_app` serves it; `qlora serve` (qlora_cli/serve.py) migrates the
database first. OpenAPI is at `/openapi.json`, the interactive docs at `/docs`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.bodylimit import BodyLimitMiddleware
from api.metrics import LatencyMiddleware, make_registry
from api.metrics import router as metrics_router
from api.errors import install_error_handlers
from api.ratelimit import make_limiter
from api.routes import console, files, health, inference, job_outputs, jobs, models, webhooks
from api.schemas import ErrorResponse
from service.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: the process settings from `QLORA_*`).

    Args:
        settings: configuration; its directories are created if missing.

    Returns:
        The ASGI app. The database must already be migrated (`service.migrate.upgrade()`).
    """
    settings = settings or get_settings()
    settings.ensure_dirs()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Every API process sends webhooks from the database outbox (See Note: webhook outbox).
        from service.database import get_engine
        from service.webhooks import Dispatcher

        dispatcher = Dispatcher(get_engine(settings.database_url), settings.webhook_allow_insecure,
                                poll_s=settings.webhook_poll_s)
        dispatcher.start()
        try:
            yield
        finally:
            dispatcher.stop()

    app = FastAPI(
        lifespan=lifespan,
        title="QLoRA fine-tuning service",
        version="0.1.0",
        description="Self-hosted QLoRA fine-tuning with OpenAI's fine-tuning API (wire-compatible), "
        "plus adapter downloads. Authenticate with `Authorization: Bearer sk-qlora-...`.",
    )
    app.state.settings = settings
    app.state.rate_limiter = make_limiter(settings.broker_url, settings.rate_limit_per_minute)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware)
    app.state.metrics_registry, latency = make_registry(settings)
    app.add_middleware(LatencyMiddleware, histogram=latency)
    # Every /v1 operation may answer these (auth, rate limit, a bad request, the database down).
    common = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 500, 503)}
    for r in (files.router, jobs.router, job_outputs.router, models.router, inference.router, webhooks.router):
        app.include_router(r, responses=common)  # type: ignore[arg-type]
    app.include_router(health.router, responses={500: {"model": ErrorResponse}})
    app.include_router(metrics_router, responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}})
    app.include_router(console.router)
    return app
