"""`qlora worker`: a Celery worker that trains one job per fresh child, with its monitor thread.

Pool: prefork with `--max-tasks-per-child=1` (Celery's advice for jobs that hold a GPU, and
REFERENCES "Celery for long GPU jobs"): every job runs in a newly forked child, so its CUDA
context and any leaked memory die with it, and the parent never touches CUDA. Checked with both
brokers (Redis, and kombu's `sqla+sqlite` transport); `solo` would run jobs in the parent itself
and keep a CUDA context alive across jobs, so it is not used.

Beside Celery, one daemon thread in the parent (the monitor) records this worker in the
`workers` table (device, memory and native compute dtype, probed in a subprocess: worker/device.py), refreshes
`last_seen_at` every `heartbeat_s`, and runs the reconciler every `reconcile_interval_s`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from sqlalchemy import Engine, insert, update
from sqlalchemy.exc import IntegrityError

from service.db import Worker
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)

_workers = Worker.__table__


def default_nodename() -> str:
    """`qlora@<machine>`: stable across restarts, so a restarted worker recognises its own leases."""
    return f"qlora@{socket.gethostname()}"


def register_worker(engine: Engine, nodename: str, device: str, memory_bytes: int,
                    compute_dtype: str | None = None) -> None:
    """Insert or refresh this worker's row (alive, device, memory, native compute dtype)."""
    t = int(time.time())
    values = {"device": device, "device_memory_bytes": memory_bytes, "compute_dtype": compute_dtype,
              "last_seen_at": t, "alive": True}  # fmt: skip
    with engine.begin() as conn:
        if conn.execute(update(_workers).where(_workers.c.id == nodename).values(started_at=t, **values)).rowcount:
            return
    try:
        with engine.begin() as conn:
            conn.execute(insert(_workers).values(id=nodename, started_at=t, current_job=None, **values))
    except IntegrityError:  # a concurrent start inserted it first
        with engine.begin() as conn:
            conn.execute(update(_workers).where(_workers.c.id == nodename).values(**values))


class Monitor(threading.Thread):
    """The parent-side daemon thread: device probe, worker heartbeat, reconciler."""

    def __init__(self, settings: Settings, engine: Engine, nodename: str, concurrency: int) -> None:
        super().__init__(name="qlora-monitor", daemon=True)
        self.settings, self.engine, self.nodename, self.concurrency = settings, engine, nodename, concurrency
        self.stopping = threading.Event()

    def run(self) -> None:
        from service.queue import enqueue_job
        from worker.device import probe_in_subprocess
        from worker.reconcile import reconcile_once

        report = probe_in_subprocess(override_memory_bytes=self.settings.device_memory_bytes)
        log.info("worker %s: %s, %.1f GiB, compute_dtype auto = %s (%s)", self.nodename, report["device"],
                 report["memory_bytes"] / 2**30, report.get("compute_dtype"), report.get("dtype_reason"))
        next_reconcile = 0.0
        while not self.stopping.is_set():
            try:
                register_worker(self.engine, self.nodename, report["device"], report["memory_bytes"],
                                report.get("compute_dtype"))
                if time.monotonic() >= next_reconcile:
                    reconcile_once(self.engine, self.settings, self.nodename, self.concurrency, enqueue_job)
                    next_reconcile = time.monotonic() + self.settings.reconcile_interval_s
            except Exception as e:  # the database may blink; the next tick tries again
                log.warning("worker monitor: %s", e)
            self.stopping.wait(min(self.settings.heartbeat_s, self.settings.reconcile_interval_s))

    def stop(self) -> None:
        self.stopping.set()


def _preload_torch() -> None:
    """Import torch once in the parent so each forked job child starts with it loaded."""
    # Note: preloading torch. `import torch` does not initialise CUDA (that happens at the first
    # CUDA call), so children forked afterwards can still use the GPU; it saves every job the
    # seconds of importing torch. bitsandbytes and transformers probe the device at import
    # (`torch.cuda.is_available()`, which initialises the driver and would break CUDA in forked
    # children), so with a CUDA (or ROCm) build of torch nothing else is preloaded. A CPU build
    # has no GPU to break: there the parent imports what a training child imports too
    # (transformers, PEFT, bitsandbytes and the engine), which on a real AVX2-only AMD EPYC took
    # ~9 s of every job's start (`python -c "import peft"`: 12.3 s, torch alone 3.7 s). Those
    # imports start no thread (the process has as many before as after, checked), so the fork
    # stays safe from OpenMP's pool, which only the first parallel op starts.
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_initialized():  # would poison every forked child; fail loudly instead
        raise RuntimeError("CUDA was initialised in the worker's parent process")
    if torch.version.cuda is None and torch.version.hip is None:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401

        import qlora_core.train  # noqa: F401


def run_worker(concurrency: int = 1, hostname: str | None = None) -> int:
    """Run a Celery worker until it is stopped (SIGTERM: warm shutdown; SIGQUIT: cold).

    Args:
        concurrency: jobs trained at once (one per child process; one per GPU is usual).
        hostname: the Celery node name; default `qlora@<machine>`.

    Returns:
        The process exit status (0 after a clean shutdown).
    """
    from service.database import get_worker_engine
    from service.queue import QUEUE
    from worker.app import app

    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    settings = get_settings()
    settings.ensure_dirs()
    nodename = hostname or default_nodename()
    engine = get_worker_engine(settings.database_url, settings.lease_s)
    _preload_torch()
    monitor = Monitor(settings, engine, nodename, concurrency)
    monitor.start()
    argv = [
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        f"--hostname={nodename}",
        f"--queues={QUEUE}",
        "--max-tasks-per-child=1",
        "--prefetch-multiplier=1",
        "--loglevel=INFO",
        # Gossip, mingle and the event heartbeat use broadcast exchanges that the SQLAlchemy
        # transport only emulates by polling; the workers table does their job here.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    try:
        app.worker_main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        monitor.stop()
        with engine.begin() as conn:
            conn.execute(update(_workers).where(_workers.c.id == nodename).values(alive=False, current_job=None))
    return 0
