"""`qlora serve`: migrate, make sure a dev key exists, start a worker and an inference server, run the API.

The embedded mode of the service (`make run`, `make demo`): one command, no servers to install.
The API process stays torch-free (CONTRACT: routes only validate, record and enqueue), so the
worker is a separate process (`qlora worker`, the same command docker compose runs), and the
bundled base model is registered by a short `qlora models ensure-bundled` subprocess. The inference
server (`qlora infer`) is a third process, restarted by a supervisor thread here if it dies (the
API answers 503 `inference_unavailable` meanwhile). The
shutdown follows docker's convention: SIGTERM, a grace period, then SIGKILL; a job interrupted
that way resumes from its last checkpoint when a worker starts again (worker/lease.py).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from service.lifetime import owned_child_env
from qlora_cli.probe import free_port
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)

DEV_KEY_FILE = "dev_api_key"
WORKER_STOP_GRACE_S = 10.0


def dev_api_key(settings: Settings) -> str:
    """The dev tenant's API key, created on first start and remembered in `data_dir/dev_api_key`.

    The file (mode 0600) holds the plaintext key, so later starts print the same key; if the
    database no longer knows it (a new database behind the same data dir), a new key is made.
    """
    from service.database import session_scope
    from service.keys import InvalidApiKey, authenticate, create_key

    path = Path(settings.data_dir) / DEV_KEY_FILE
    if path.is_file():
        key = path.read_text().strip()
        try:
            with session_scope(settings.database_url) as session:
                authenticate(session, key)
            return key
        except InvalidApiKey:
            log.warning("the key in %s is not valid in this database; creating a new one", path)
    key = create_key(settings.dev_tenant, name="dev key (qlora serve)", database_url=settings.database_url)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.chmod(path, 0o600)
    return key


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    """Start `qlora worker` in its own process group (so Ctrl-C reaches only this process,
    which then stops the worker in order); it dies with this process however this process dies
    (See Note: owned children in service/lifetime.py)."""
    cmd = [sys.executable, "-m", "qlora_cli.main", "worker"]
    log.info("starting the worker: %s", " ".join(cmd))
    return subprocess.Popen(cmd, env=owned_child_env(_child_env()), start_new_session=True)


def stop_worker(proc: subprocess.Popen[bytes], grace_s: float = WORKER_STOP_GRACE_S) -> int:
    """SIGTERM the worker's main process (Celery's warm shutdown), then SIGKILL its whole group after `grace_s`.

    # Note: SIGTERM to the main process only. Celery's warm shutdown stops its prefork children
    # itself. SIGTERM sent to the whole group also killed an idle child while it held the pool's
    # task-queue lock, and the main process then waited on that lock at exit forever (billiard's
    # `_help_stuff_finish`, seen with `py-spy dump`): an idle worker did not stop in 2 of 6 tries and
    # was SIGKILLed after the grace. Docker stops a container the same way (SIGTERM to PID 1).

    Returns:
        The worker's exit status.
    """
    if proc.poll() is not None:
        return proc.returncode
    try:
        os.kill(proc.pid, signal.SIGTERM)
        return proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        log.warning("the worker did not stop within %.0f s; killing it (its job resumes on the next start)", grace_s)
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()
    except ProcessLookupError:
        return proc.wait()


class InferenceSupervisor:
    """Runs `qlora infer` on a loopback port and starts it again whenever it exits (backoff to 30 s)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="inference-supervisor", daemon=True)

    def _start(self) -> None:
        cmd = [sys.executable, "-m", "qlora_cli.main", "infer", "--host", "127.0.0.1", "--port", str(self.port)]
        log.info("starting the inference server: %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, env=owned_child_env(_child_env()), start_new_session=True)

    def start(self) -> None:
        self._start()
        self._thread.start()

    def _watch(self) -> None:
        delay = 1.0
        while not self._stop.wait(1.0):
            if self.proc is not None and self.proc.poll() is not None and not self._stop.is_set():
                log.warning("the inference server exited (status %s); restarting it in %.0f s",
                            self.proc.returncode, delay)  # fmt: skip
                if self._stop.wait(delay):
                    return
                started = time.monotonic()
                self._start()
                self.restarts += 1
                delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30.0)

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None:
            stop_worker(self.proc, grace_s=5.0)


def serve(host: str | None = None, port: int | None = None, with_worker: bool = True, with_inference: bool = True) -> int:
    """Run the service in the foreground until SIGINT/SIGTERM.

    Args:
        host: interface to bind (default `QLORA_HOST`, 127.0.0.1).
        port: TCP port (default `QLORA_PORT`, 8000).
        with_worker: also run one `qlora worker` subprocess (the embedded mode).
        with_inference: also run `qlora infer` (on QLORA_INFERENCE_PORT when set, else a free
            loopback port) and point the API at it, unless QLORA_INFERENCE_URL names another one.

    Returns:
        The exit status: 0 after a clean shutdown.
    """
    import uvicorn

    from service.migrate import upgrade

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    host = host or settings.host
    port = port if port is not None else settings.port
    settings.ensure_dirs()
    upgrade(settings.database_url)
    key = dev_api_key(settings)

    worker: subprocess.Popen[bytes] | None = None
    bundled: subprocess.Popen[bytes] | None = None
    if with_worker:
        # Registering the bundled model imports transformers (and, the first time, dequantizes
        # a GGUF for ~15 s): done beside the API, never inside it.
        bundled = subprocess.Popen([sys.executable, "-m", "qlora_cli.main", "models", "ensure-bundled"],
                                   env=owned_child_env(_child_env()))
        worker = start_worker(settings)
    inference: InferenceSupervisor | None = None
    if with_inference and not settings.inference_url:
        inference = InferenceSupervisor(settings.inference_port if "QLORA_INFERENCE_PORT" in os.environ else free_port())
        inference.start()
        os.environ["QLORA_INFERENCE_URL"] = inference.url  # read by the API's settings below
        get_settings.cache_clear()

    url = f"http://{host}:{port}"
    banner = (
        f"\nQLoRA fine-tuning service at {url}  (OpenAI base_url: {url}/v1, docs: {url}/docs)\n"
        f"web console: {url}/  (sign in with the key below)\n"
        f"data dir: {settings.data_dir}  ({'embedded' if settings.embedded else 'external'} database and broker)\n"
        f"dev API key (tenant {settings.dev_tenant!r}): {key}\n"
        f"inference server: {inference.url if inference else (settings.inference_url or 'none')}\n"
    )
    print(banner, flush=True)  # the one thing a person starting the service needs to read

    # Uvicorn handles SIGINT/SIGTERM itself (graceful HTTP shutdown) and afterwards re-raises the
    # signal to the handler that was installed before it: with the default SIGTERM handler that
    # would kill this process before the `finally` below stops the worker. So install our own.
    stop_signals: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop_signals.append(signum))
    config = uvicorn.Config("api.main:create_app", factory=True, host=host, port=port, log_level="info")
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        if bundled is not None and bundled.poll() is None:
            bundled.terminate()
        if inference is not None:
            inference.stop()
        if worker is not None:
            code = stop_worker(worker)
            log.info("worker stopped (exit status %s)", code)
    return 0 if server.started else 1
