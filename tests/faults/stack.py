"""A whole service that fault tests may wound: API, `qlora worker` processes, database, broker.

Built on tests/faults/services.py (private servers a test may kill and restart). Two modes:

- production: a private PostgreSQL and a private Redis (append-only, or none for the tests where
  the broker must *lose* its messages) and a uvicorn API process;
- embedded: SQLite and kombu's `sqla+sqlite` broker under a temp data dir, the same API process.

Workers are real `qlora worker` processes in their own session, so `kill()` is SIGKILL to the
whole process group (the Celery parent and its prefork job child at once: a lost machine), and
`pause()`/`resume()` are SIGSTOP/SIGCONT (a hung machine that stops heart-beating). The stack gives
short lease, heartbeat and reconcile periods, so a takeover or a re-send happens in seconds.
Everything a test asserts is read the way a user or an operator would: the job through the
`openai` SDK, its rows through SQLAlchemy, checkpoints on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from tests.faults.services import ApiServer, ServerProcess, start_api_server

TINY_MODEL_ID = "test/tiny-llama"
JOB_TIMEOUT_S = 240.0
# Short periods so takeovers and re-sends happen within seconds (grace = max(2 * reconcile, 5) s).
FAST_ENV = {"QLORA_HEARTBEAT_S": "1", "QLORA_LEASE_S": "6", "QLORA_RECONCILE_INTERVAL_S": "2",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
# A job small enough for a shared 2-core machine; its steps are slow enough to kill between.
JOB_QLORA = {"lora_r": 4, "lora_alpha": 8, "max_seq_length": 64, "gradient_accumulation_steps": 1,
             "learning_rate": 1e-3, "compute_dtype": "float32", "optimizer": "adamw_torch"}


def training_jsonl(n: int) -> bytes:
    """`n` chat examples (additions), the same bytes every time: runs to compare see the same data."""
    lines = [json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i + 1}?"},
        {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1}."},
    ]}) for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def preference_jsonl(n: int) -> bytes:
    """`n` preference pairs (DPO), the same bytes every time: the preferred reply in a fixed form."""
    lines = [json.dumps({"input": {"messages": [{"role": "user", "content": f"What is {i} plus {i + 1}?"}]},
                         "preferred_output": [{"role": "assistant", "content": f"Answer: {2 * i + 1}."}],
                         "non_preferred_output": [{"role": "assistant", "content": f"maybe {2 * i + 2}, roughly"}]})
             for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def qlora_cmd(*args: str) -> list[str]:
    """The `qlora` console script of this interpreter's environment (or `python -m qlora_cli.main`)."""
    script = Path(sys.executable).parent / "qlora"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "qlora_cli.main", *args]


class WorkerProcess:
    """One `qlora worker` (Celery parent + prefork child) in its own session."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name, self.env, self.log_path = name, env, log_path
        self.hostname = f"{name}@faults"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(qlora_cmd("worker", "--hostname", self.hostname), env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def group_pids(self) -> list[int]:
        """Every live process of the worker's session (parent, pool child, device probe)."""
        pids = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    if os.getpgid(int(entry.name)) == self.proc.pid:
                        pids.append(int(entry.name))
                except (ProcessLookupError, PermissionError):
                    continue
        return pids

    def kill(self) -> None:
        """SIGKILL the parent and its children at once (no shutdown code runs anywhere)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while self.group_pids() and time.monotonic() < deadline:  # orphaned children die too
            time.sleep(0.05)

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self, grace_s: float = 30.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL after `grace_s`."""
        if not self.running:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGTERM)  # Celery stops its own children (See Note: SIGTERM to the main process only)
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
        except ProcessLookupError:
            pass

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until Celery logs `<hostname> ready.`: the worker consumes from the queue from then on."""
        deadline = time.monotonic() + timeout_s
        while f"{self.hostname} ready." not in self.log():
            if not self.running:
                raise AssertionError(f"worker {self.name} exited before it was ready:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {self.name} not ready after {timeout_s:.0f} s:\n{self.log()[-3000:]}")
            time.sleep(0.05)


@dataclass
class Stack:
    """A live service: `api` (uvicorn), `workers`, and the servers or files behind them."""

    mode: str
    root: Path
    env: dict[str, str]
    api: ApiServer
    key: str
    database_url: str
    redis: ServerProcess | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    _file_ids: dict[str, str] = field(default_factory=dict)

    # --- processes --------------------------------------------------------------------------
    def start_worker(self, name: str | None = None, **extra_env: str) -> WorkerProcess:
        name = name or f"w{len(self.workers) + 1}"
        w = WorkerProcess(name, {**self.env, **extra_env}, self.root / f"worker-{name}.log")
        self.workers.append(w)
        return w

    def stop_workers(self) -> None:
        """Warm-stop every worker still running (a test leaves none behind for the next)."""
        for w in self.workers:
            w.stop()

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        self.api.close()

    # --- reading ----------------------------------------------------------------------------
    def client(self) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.api.url + "/v1", api_key=self.key, max_retries=2, timeout=60)

    def engine(self) -> Engine:
        from service.database import get_engine

        return get_engine(self.database_url)

    def job_row(self, job_id: str) -> Any:
        from service.db import Job

        with self.engine().connect() as conn:
            return conn.execute(select(Job.__table__).where(Job.__table__.c.id == job_id)).one()

    def events(self, job_id: str) -> list[Any]:
        """The job's event rows, oldest first (the order the SSE stream delivers them)."""
        from service.db import JobEvent

        t = JobEvent.__table__
        with self.engine().connect() as conn:
            return list(conn.execute(select(t).where(t.c.job_id == job_id).order_by(t.c.seq)))

    def metrics_steps(self, job_id: str) -> list[int]:
        return [e.data["step"] for e in self.events(job_id) if e.type == "metrics"]

    def messages(self, job_id: str) -> list[str]:
        return [e.message for e in self.events(job_id) if e.type == "message"]

    def job_dir(self, job_id: str) -> Path:
        return self.root / "data" / "artifacts" / "jobs" / job_id

    def logs(self) -> str:
        parts = [f"--- api ---\n{self.api.log_tail(3000)}"]
        parts += [f"--- worker {w.name} ---\n{w.log()[-6000:]}" for w in self.workers]
        return "\n".join(parts)

    # --- acting -----------------------------------------------------------------------------
    def create_job(self, max_steps: int, n_examples: int = 24, seed: int = 7, batch_size: int = 2,
                   dpo: bool = False, **qlora: Any) -> str:
        """Create a job through the SDK (one shared training file per stack and method); returns its id.

        `dpo=True`: a DPO job (`method` type dpo, beta 0.1) on `n_examples` preference pairs.
        """
        import io

        client = self.client()
        key = "dpo" if dpo else "sft"
        if key not in self._file_ids:
            data = preference_jsonl(n_examples) if dpo else training_jsonl(n_examples)
            self._file_ids[key] = client.files.create(file=(f"{key}.jsonl", io.BytesIO(data)), purpose="fine-tune").id
        hp = {"n_epochs": 1, "batch_size": batch_size}
        method = {"type": "dpo", "dpo": {"hyperparameters": {**hp, "beta": 0.1}}} if dpo else None
        job = client.fine_tuning.jobs.create(
            model=TINY_MODEL_ID, training_file=self._file_ids[key], seed=seed, suffix="faults",
            **({"method": method} if dpo else {"hyperparameters": hp}),
            extra_body={"qlora": {**JOB_QLORA, "max_steps": max_steps, **qlora}},
        )
        return str(job.id)

    def wait_until(self, what: str, predicate: Callable[[], bool], timeout_s: float = JOB_TIMEOUT_S,
                   poll_s: float = 0.05) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(poll_s)

    def wait_step(self, job_id: str, step: int, timeout_s: float = JOB_TIMEOUT_S) -> None:
        """Wait until the job has recorded the metrics event of `step` (or a later one)."""
        self.wait_until(f"step {step} of {job_id}",
                        lambda: max(self.metrics_steps(job_id), default=0) >= step, timeout_s, poll_s=0.01)

    def wait_finished(self, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> Any:
        """The job as the SDK returns it once it is succeeded, failed or cancelled."""
        from service.db import FINISHED_STATUSES
        from qlora_cli.probe import wait_for_job_status

        return wait_for_job_status(self.client(), job_id, FINISHED_STATUSES, timeout_s, log_tail=self.logs)


def build_stack(mode: str, tiny_model_dir: Path, pg_url: str | None = None, redis: ServerProcess | None = None,
                root: Path | None = None, **extra_env: str) -> Stack:
    """Migrate the database, import the tiny model, create a key and start the API (no worker yet).

    Args:
        mode: "production" (pass `pg_url` and `redis`) or "embedded" (SQLite + sqla broker).
        tiny_model_dir: the tiny random Llama (tests/conftest.py's `tiny_model_dir`).
        pg_url: the private PostgreSQL database of a production stack.
        redis: the private Redis of a production stack.
        root: where data and logs go (a new temp dir by default).
        extra_env: more QLORA_* settings for every process (e.g. QLORA_JOB_TIME_LIMIT_S).
    """
    from qlora_core.store import ModelStore
    from service.keys import create_key
    from service.migrate import upgrade

    root = root or Path(tempfile.mkdtemp(prefix=f"qlora-faults-{mode}-"))
    data = root / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    repo = str(Path(__file__).resolve().parents[2])
    env.update(FAST_ENV, QLORA_DATA_DIR=str(data), PYTHONPATH=os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")])))
    if mode == "production":
        if pg_url is None or redis is None:
            raise ValueError("a production stack needs pg_url and redis")
        env.update(QLORA_DATABASE_URL=pg_url, QLORA_BROKER_URL=redis.url)
        database_url = pg_url
    elif mode == "embedded":
        database_url = f"sqlite:///{(data / 'qlora.db').resolve()}"
    else:
        raise ValueError(f"mode must be production or embedded, got {mode!r}")
    env.update(extra_env)
    data.mkdir(parents=True, exist_ok=True)
    upgrade(database_url)
    # With QLORA_STORAGE_URL=s3://... in extra_env the model goes to the bucket (and this dir's cache).
    from service.objectstore import model_remote
    from service.settings import Settings

    settings = Settings(data_dir=data, storage_url=env.get("QLORA_STORAGE_URL", ""),
                        s3_endpoint_url=env.get("QLORA_S3_ENDPOINT_URL", ""))
    ModelStore(settings.models_dir, remote=model_remote(settings)).import_model(tiny_model_dir, TINY_MODEL_ID)
    key = create_key("faults", database_url=database_url)
    api_env = {k: v for k, v in env.items() if k.startswith("QLORA_") or k == "HF_HUB_OFFLINE"}
    api = start_api_server(api_env, workdir=root)
    return Stack(mode, root, env, api, key, database_url, redis=redis)


def load_adapter_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))
