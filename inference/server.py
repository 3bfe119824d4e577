"""`qlora infer`: run the inference server (engine + internal HTTP app) until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
from pathlib import Path

from service.settings import get_settings

log = logging.getLogger(__name__)


def run_inference(host: str | None = None, port: int | None = None) -> int:
    """Serve `POST /internal/generate` on host:port (default `QLORA_INFERENCE_HOST`/`_PORT`).

    Returns:
        The exit status: 0 after a clean shutdown.
    """
    import uvicorn

    from inference.app import create_app
    from inference.engine import Engine
    from qlora_core.store import ModelStore
    from service.objectstore import get_storage, model_remote

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    store = ModelStore(settings.models_dir, remote=model_remote(settings))

    storage = get_storage(settings)

    def resolve_base(model_id: str) -> Path:
        return store.model_path(model_id)

    def resolve_adapter(rel: str) -> str:  # the API sends where the adapter is in the artifact store
        return str(storage.fetch_tree("artifacts", rel))

    engine = Engine(resolve_base, max_batch=settings.inference_max_batch,
                    max_adapter_bytes=settings.inference_max_adapter_bytes, resolve_adapter=resolve_adapter,
                    dense_max_bytes=settings.inference_dense_max_bytes)  # fmt: skip
    engine.start()
    host = host or settings.inference_host
    port = port if port is not None else settings.inference_port
    log.info("inference server on http://%s:%d (device %s)", host, port, engine.device)
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host=host, port=port, log_level="info"))
    try:
        server.run()
    finally:
        engine.stop()
    return 0 if server.started else 1
