"""A live service for end-to-end tests: `qlora serve --no-worker` and a real `qlora worker`, as
separate processes, in both modes:

- embedded: SQLite + kombu's `sqla+sqlite` broker under a temp data dir (what `make run` uses);
- production: a private PostgreSQL database + a private Redis db number (what compose runs).

The tiny random Llama is imported into the temp model store with `qlora models import`, exactly as
a user adds a base model. The processes get short heartbeat/reconcile periods so tests do not wait.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qlora_cli.probe import free_port, wait_until_ready
from tests.e2e.services import private_postgres, private_redis

TINY_MODEL_ID = "test/tiny-llama"
READY_TIMEOUT_S = 180


def qlora_cmd(*args: str) -> list[str]:
    """The `qlora` console script of this interpreter's environment (or `python -m qlora_cli.main`)."""
    script = Path(sys.executable).parent / "qlora"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "qlora_cli.main", *args]


@dataclass
class LiveService:
    mode: str
    base_url: str  # http://127.0.0.1:PORT
    api_key: str
    data_dir: Path
    env: dict[str, str]
    logs: dict[str, Path] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def client(self):  # type: ignore[no-untyped-def]
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key, max_retries=0, timeout=60)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def log_tail(self, n: int = 60) -> str:
        """The last lines of every process log, for assertion messages."""
        out = []
        for name, path in self.logs.items():
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            out.append(f"--- {name} ---\n" + "\n".join(lines[-n:]))
        return "\n".join(out)


def _run(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)  # it stops its own children (See Note: SIGTERM to the main process only)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


@pytest.fixture(scope="module", params=["embedded", "production"])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveService]:
    """A running API + worker pair in `request.param` mode, with an API key of tenant `e2e`."""
    root = tmp_path_factory.mktemp(f"e2e-{request.param}")
    data_dir = root / "data"
    env = dict(os.environ)
    for k in [k for k in env if k.startswith("QLORA_") and k != "QLORA_REQUIRE_SERVICES"]:
        del env[k]  # nothing from the developer's shell leaks into the service under test
    env.update(
        QLORA_DATA_DIR=str(data_dir),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        QLORA_HEARTBEAT_S="2",
        QLORA_LEASE_S="30",
        QLORA_RECONCILE_INTERVAL_S="5",
        QLORA_WEBHOOK_ALLOW_INSECURE="true",  # the tests' receivers listen on loopback over http
        QLORA_WEBHOOK_POLL_S="0.5",
    )
    with ExitStack() as stack:
        if request.param == "production":
            env["QLORA_DATABASE_URL"] = stack.enter_context(private_postgres())
            env["QLORA_BROKER_URL"] = stack.enter_context(private_redis())
        _run(qlora_cmd("db", "upgrade"), env)
        _run(qlora_cmd("models", "import", str(tiny_model_dir), "--id", TINY_MODEL_ID), env)
        key = _run(qlora_cmd("keys", "create", "--tenant", "e2e"), env).strip().splitlines()[-1]
        port = free_port()
        service = LiveService(request.param, f"http://127.0.0.1:{port}", key, data_dir, env)
        procs = service.procs
        for name, cmd in (
            ("api", qlora_cmd("serve", "--no-worker", "--host", "127.0.0.1", "--port", str(port))),
            ("worker", qlora_cmd("worker", "--hostname", f"e2e-{secrets.token_hex(4)}@{socket.gethostname()}")),
        ):
            log = root / f"{name}.log"
            service.logs[name] = log
            fh = stack.enter_context(open(log, "wb"))
            procs[name] = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            stack.callback(_stop, procs[name])
        wait_until_ready(service.base_url, procs, READY_TIMEOUT_S, log_tail=service.log_tail)
        yield service
