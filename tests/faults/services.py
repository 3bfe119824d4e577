"""Private Redis, PostgreSQL and API server processes that fault tests may stop, kill and restart.

The shared CI servers (tests/e2e/services.py) must never be stopped by a test, so every
destructive test starts its own server on a spare port, in a temporary directory, and owns it:

    url, redis = start_private_redis()          # redis://127.0.0.1:PORT/0
    url, pg = start_private_postgres()          # postgresql+psycopg://postgres@127.0.0.1:PORT/qlora
    api = start_api_server({"QLORA_DATA_DIR": ..., "QLORA_DATABASE_URL": url})   # api.url
    pg.stop(); pg.start(); pg.kill(); pg.close()

`stop()` is a clean shutdown (Redis saves its append-only file, PostgreSQL a fast shutdown),
`kill()` is SIGKILL to the whole process group (a crash: no shutdown code runs), `start()` starts
the same server again on the same port and data directory, and waits until it answers.
`close()` kills it and deletes its directory; it also runs at interpreter exit, so nothing
outlives the test run. tests/faults/conftest.py wraps these as the fixtures `private_redis`,
`private_postgres` (each yields the handle; `handle.url` is its URL).

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user
(`Popen(user=...)`) with its directory chowned to it; trust authentication on 127.0.0.1 and a
unix socket inside the temporary directory. Binaries: `redis-server` on PATH, PostgreSQL from
$QLORA_PG_BIN, /usr/lib/postgresql/*/bin or PATH. A missing binary raises `ServiceUnavailable`,
which the fixtures turn into a failure when QLORA_REQUIRE_SERVICES=1 and a skip elsewhere.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qlora_cli.probe import free_port
from service.lifetime import owned_child_env

START_TIMEOUT_S = 60.0
# Figures the fault tests measured (e.g. requests tried); conftest prints them as key=value at the end.
FIGURES: dict[str, int] = {}
STOP_TIMEOUT_S = 30.0


class ServiceUnavailable(RuntimeError):
    """A server binary is missing or the server did not come up."""


def require(exc: ServiceUnavailable) -> None:
    """Fail (QLORA_REQUIRE_SERVICES=1, as in CI) or skip the current test for `exc`."""
    if os.environ.get("QLORA_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{exc} (QLORA_REQUIRE_SERVICES=1)")
    pytest.skip(str(exc))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class ServerProcess:
    """One server process (own session, so a kill reaches its children) that can be restarted."""

    def __init__(self, name: str, argv: list[str], port: int, url: str, workdir: Path, user: str | None = None,
                 env: dict[str, str] | None = None, stop_signal: int = signal.SIGTERM) -> None:
        self.name, self.argv, self.port, self.url, self.workdir = name, argv, port, url, workdir
        self.user, self.env, self.stop_signal = user, env, stop_signal
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"
        atexit.register(self.close)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _ready(self) -> bool:
        return port_open(self.port)

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the server (again) and wait until it accepts connections."""
        if self.running:
            return
        log = open(self.log_path, "ab")
        kwargs = {"user": self.user} if self.user else {}
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.workdir, env=self.env, start_new_session=True, **kwargs)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceUnavailable(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            if self._ready():
                return
            time.sleep(0.1)
        self.kill()
        raise ServiceUnavailable(f"{self.name} did not answer on port {self.port} in {timeout_s:.0f} s: "
                                 f"{self.log_tail()}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Clean shutdown; falls back to kill() after `timeout_s`."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self._wait_port_closed()

    def kill(self) -> None:
        """SIGKILL the server and every process of its session (a crash: no shutdown runs)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        self._wait_port_closed()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Kill the server and delete its directory (idempotent; also runs at exit)."""
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _wait_port_closed(self) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _workdir(prefix: str, owner: str | None = None) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    if owner:
        pw = pwd.getpwnam(owner)
        os.chown(d, pw.pw_uid, pw.pw_gid)
    return d


def start_private_redis(persistent: bool = True) -> tuple[str, ServerProcess]:
    """Start a private redis-server on a spare port.

    Args:
        persistent: keep an append-only file (fsync every write), so a clean stop/start keeps
            every queued message, as a production Redis configured for a broker should.

    Returns:
        (url, handle): `redis://127.0.0.1:PORT/0` and the process handle.

    Raises:
        ServiceUnavailable: redis-server is not installed or did not start.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceUnavailable("redis-server is not on PATH")
    port = free_port()
    workdir = _workdir("qlora-redis-")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
            "--protected-mode", "no", "--daemonize", "no"]
    if persistent:
        argv += ["--appendonly", "yes", "--appendfsync", "always"]
    handle = ServerProcess("redis", argv, port, f"redis://127.0.0.1:{port}/0", workdir)
    try:
        handle.start()
    except ServiceUnavailable:
        handle.close()
        raise
    return handle.url, handle


def postgres_bin_dir() -> Path:
    """The directory holding initdb and postgres (raises ServiceUnavailable)."""
    candidates = [os.environ.get("QLORA_PG_BIN", "")] + sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "postgres").is_file():
            return Path(c)
    raise ServiceUnavailable("PostgreSQL binaries (initdb, postgres) not found; set QLORA_PG_BIN")


class PostgresProcess(ServerProcess):
    def _ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                                 connect_timeout=2):
                return True
        except psycopg.OperationalError:  # refuses while starting up or recovering
            return False


def start_private_postgres(database: str = "qlora") -> tuple[str, PostgresProcess]:
    """initdb a private PostgreSQL cluster, start it on a spare port and create `database`.

    fsync is off: a killed *server* loses nothing with it (the OS still holds the pages), only a
    killed machine would, and the tests are much faster.

    Returns:
        (url, handle): `postgresql+psycopg://postgres@127.0.0.1:PORT/<database>` and the handle.

    Raises:
        ServiceUnavailable: binaries missing, or initdb / the server failed.
    """
    import psycopg

    bindir = postgres_bin_dir()
    user = "postgres" if os.geteuid() == 0 else None
    workdir = _workdir("qlora-pg-", owner=user)
    data = workdir / "data"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(workdir)}
    kwargs = {"user": user} if user else {}
    init = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                           "--no-sync"], capture_output=True, text=True, env=env, cwd=workdir, **kwargs)
    if init.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise ServiceUnavailable(f"initdb failed: {init.stderr[-2000:]}")
    port = free_port()
    argv = [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(workdir),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off",
            "-c", "max_connections=100", "-c", "shared_buffers=16MB"]
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"
    # SIGINT is PostgreSQL's "fast shutdown": roll back open transactions, checkpoint, exit.
    handle = PostgresProcess("postgres", argv, port, url, workdir, user=user, env=env, stop_signal=signal.SIGINT)
    try:
        handle.start()
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')  # type: ignore[arg-type]
    except (ServiceUnavailable, psycopg.Error):
        handle.close()
        raise
    return url, handle


class ApiServer(ServerProcess):
    def _ready(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False


def start_api_server(env: dict[str, str], workdir: Path | None = None) -> ApiServer:
    """Start `uvicorn --factory api.main:create_app` on a spare port with `env` over os.environ.

    The database must be migrated already (`service.migrate.upgrade(url)`). `QLORA_*` variables
    of this process are not inherited: the server sees only those in `env`, so a developer's own
    settings never leak into a private server. The handle's `url` is the base URL
    (`http://127.0.0.1:PORT`); stop/start/kill restart the same API.
    """
    port = free_port()
    wd = workdir or Path(tempfile.mkdtemp(prefix="qlora-api-"))
    repo = str(Path(__file__).resolve().parents[2])
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    full_env = {**inherited, **env, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning"]
    handle = ApiServer("api", argv, port, f"http://127.0.0.1:{port}", wd, env=full_env)
    try:
        handle.start()
    except ServiceUnavailable:
        handle.close()
        raise
    return handle


class S3Server(ServerProcess):
    """moto's standalone S3 server (`moto_server`) on a 127.0.0.1 port: a real HTTP S3 endpoint in its
    own process, which the service reaches through boto3 exactly as it would reach AWS or MinIO."""

    def _ready(self) -> bool:
        if not port_open(self.port):
            return False
        import httpx

        try:
            return httpx.get(self.url + "/", timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    def storage_env(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """The settings that point a service process at `s3://bucket/prefix` on this server."""
        return {"QLORA_STORAGE_URL": f"s3://{bucket}/{prefix}".rstrip("/"), "QLORA_S3_ENDPOINT_URL": self.url,
                **S3_CREDENTIALS}

    def make_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.url, **{k.lower(): v for k, v in S3_CREDENTIALS.items()
                                                      if k != "AWS_DEFAULT_REGION"},
                     region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)
        return name


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def start_s3_server() -> S3Server:
    """Start `moto_server` (installed with the dev extras, so never skipped) and wait until it answers."""
    for k, v in S3_CREDENTIALS.items():  # this process's clients (boto3 reads them from the environment)
        os.environ.setdefault(k, v)
    port = free_port()
    # moto's server dies with this process even when it is SIGKILLed (no atexit runs then): it is
    # started through `service.lifetime.adopt_from_env` (Note: owned children).
    argv = [sys.executable, "-c", "from service.lifetime import adopt_from_env; adopt_from_env(); "
            "from moto.server import main; main()"]
    repo = str(Path(__file__).resolve().parents[2])
    env = owned_child_env({**os.environ, **S3_CREDENTIALS,
                           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))})
    server = S3Server("moto", [*argv, "-H", "127.0.0.1", "-p", str(port)], port, f"http://127.0.0.1:{port}",
                      _workdir("qlora-s3-"), env=env)
    server.start()
    return server
