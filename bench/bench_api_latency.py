"""API latency under load, and the time from creating a job to its first training step.

Two figures about the service as a user runs it (`qlora serve`, embedded mode: SQLite + kombu's
SQLite broker in a private temporary data dir, everything on 127.0.0.1):

1. Read latency: `qlora serve --no-worker` with one job (10 chat examples on the bundled
   SmolLM2-135M-Instruct; with no worker it stays `validating_files`, which is all a read needs).
   Locust (bench/locustfile.py) runs 50 concurrent users for `--duration` seconds, each hitting
   `GET /v1/fine_tuning/jobs/{id}` and `GET /healthz` at random. Both endpoints share the run, so
   their p99 ratio isolates what the job read costs (auth, one SQL query, serialisation) from the
   machine's own noise; requests/s is the total of both.
2. Create -> first step: `qlora serve` (API + one embedded worker) with a tiny random Llama imported
   via `qlora models import`. A warm-up job runs to the end first and the worker must report no
   current job (the `workers` table), so the measured job meets an idle, warmed-up worker. The
   figure is the time from `jobs.create` returning to the first `metrics` event seen by polling
   the events every 0.2 s with the openai SDK (our own clock: event `created_at` is whole seconds).

The locust idea is its headless mode (https://docs.locust.io/en/stable/running-without-web-ui.html).
Usage: python bench/bench_api_latency.py [--users 50] [--duration 20] [--work-dir DIR]
The last line holds the figures as key=value.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from openai import OpenAI

from service.db import FINISHED_STATUSES
from qlora_cli.probe import free_port, wait_for_job_status, wait_until_ready
from service.lifetime import adopt_from_env, owned_child_env

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
BUNDLED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_MODEL_ID = "tiny-llama"
READY_TIMEOUT_S = 180.0
JOB_TIMEOUT_S = 300.0
POLL_S = 0.2
# The request names bench/locustfile.py reports under (not imported: importing locust monkey-patches
# the whole process with gevent).
JOB_NAME = "GET /v1/fine_tuning/jobs/{id}"
HEALTHZ_NAME = "GET /healthz"
TINY_QLORA = {"lora_r": 4, "lora_alpha": 8, "max_seq_length": 64, "gradient_accumulation_steps": 1,
              "learning_rate": 1e-3}


def _bin(name: str) -> list[str]:
    """A console script of this interpreter's environment, else `python -m` its module."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", {"qlora": "qlora_cli.main"}.get(name, name)]


def _service_env(data_dir: Path) -> dict[str, str]:
    """The environment of a private service: no QLORA_* of the caller's shell leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env.update(QLORA_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               # Note: the limiter would otherwise answer 429 to most of the load (600/min per key).
               QLORA_RATE_LIMIT_PER_MINUTE="1000000000", QLORA_HEARTBEAT_S="2")
    return env


def _chat_jsonl(n: int) -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i + 1}?"},
                          {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1}."}]}
            for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


class Service:
    """`qlora serve` in its own process group (so a stop reaches the worker it started too)."""

    def __init__(self, data_dir: Path, with_worker: bool) -> None:
        self.data_dir, self.port = data_dir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = _service_env(data_dir)
        self.log_path = data_dir.parent / f"serve-{self.port}.log"
        argv = _bin("qlora") + ["serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if not with_worker:
            argv.append("--no-worker")
        data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, env=owned_child_env(self.env), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self) -> OpenAI:
        """Wait for `/readyz`, then return an SDK client holding the dev key."""
        wait_until_ready(self.url, {"qlora serve": self.proc}, READY_TIMEOUT_S, log_tail=self.log_tail, interval_s=0.3)
        self.key = (self.data_dir / "dev_api_key").read_text().strip()
        return OpenAI(base_url=self.url + "/v1", api_key=self.key, max_retries=0, timeout=60)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def group_running(self, needle: str) -> bool:
        """Whether a process of this service's group has `needle` in its command line."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if os.getpgid(int(proc.name)) != self.proc.pid:
                    continue
                if needle.encode() in (proc / "cmdline").read_bytes():
                    return True
            except (OSError, ProcessLookupError):
                continue
        return False

    def _descendant_groups(self) -> set[int]:
        """Process groups of every descendant (the worker runs in a session of its own)."""
        parent: dict[int, int] = {}
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    # Note: the command name in field 2 may hold spaces; the ppid follows its ')'.
                    parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        found, frontier = set(), {self.proc.pid}
        while frontier:
            frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
            found |= frontier
        groups = set()
        for pid in found:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                continue
        return groups

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the group (the server stops its worker), SIGKILL whatever is left after `grace_s`."""
        groups = self._descendant_groups() | {self.proc.pid} if self.proc.poll() is None else {self.proc.pid}
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        for group in groups:  # stragglers, if the server could not stop its worker in time
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()


def _create_job(client: OpenAI, model: str, n_examples: int, qlora: dict[str, Any] | None) -> Any:
    upload = client.files.create(file=("train.jsonl", io.BytesIO(_chat_jsonl(n_examples))), purpose="fine-tune")
    extra = {"qlora": qlora} if qlora else None
    return client.fine_tuning.jobs.create(model=model, training_file=upload.id, seed=0,
                                          hyperparameters={"n_epochs": 1, "batch_size": 2}, extra_body=extra)


def _percentile_ms(values: list[float], q: float) -> float:
    if not values:
        raise RuntimeError("no successful requests were recorded")
    return float(np.percentile(np.asarray(values), q))


def read_latency(work: Path, users: int, duration_s: int, max_requests: int) -> dict[str, float]:
    """Phase 1: locust against `qlora serve --no-worker`; returns the latency figures."""
    service = Service(work / "data-api", with_worker=False)
    try:
        client = service.wait_ready()
        job = _create_job(client, BUNDLED_MODEL_ID, 10, None)
        print(f"[latency] {service.url}: job {job.id} ({job.status}); locust: {users} users for {duration_s} s",
              flush=True)
        samples_path = work / "locust-samples.json"
        env = dict(os.environ, BENCH_JOB_ID=job.id, BENCH_API_KEY=service.key,
                   BENCH_SAMPLES_OUT=str(samples_path), BENCH_MAX_REQUESTS=str(max_requests))
        cmd = _bin("locust") + ["-f", str(BENCH_DIR / "locustfile.py"), "--headless", "-u", str(users),
                                "-r", str(users), "-t", f"{duration_s}s", "--host", service.url,
                                "--csv", str(work / "locust"), "--only-summary", "--stop-timeout", "5",
                                "--exit-code-on-error", "0", "--loglevel", "WARNING"]
        subprocess.run(cmd, env=env, cwd=REPO_ROOT, check=True, timeout=duration_s + 120)
        data = json.loads(samples_path.read_text())
    finally:
        service.stop()

    by_name: dict[str, list[float]] = {JOB_NAME: [], HEALTHZ_NAME: []}
    failures = {JOB_NAME: 0, HEALTHZ_NAME: 0}
    for name, ms, ok in data["samples"]:
        if ok:
            by_name[name].append(ms)
        else:
            failures[name] += 1
    total = len(data["samples"])
    if sum(failures.values()):
        raise RuntimeError(f"{failures} of {total} requests failed; see {work}/locust_failures.csv")
    seconds = max(data["last"] - data["first"], 1e-9)
    figures = {
        "jobs_get_p50_ms": _percentile_ms(by_name[JOB_NAME], 50),
        "jobs_get_p99_ms": _percentile_ms(by_name[JOB_NAME], 99),
        "healthz_p50_ms": _percentile_ms(by_name[HEALTHZ_NAME], 50),
        "healthz_p99_ms": _percentile_ms(by_name[HEALTHZ_NAME], 99),
        "rps": total / seconds,
    }
    figures["p99_ratio"] = figures["jobs_get_p99_ms"] / figures["healthz_p99_ms"]
    print(f"[latency] {total} requests in {seconds:.1f} s ({len(by_name[JOB_NAME])} job reads, "
          f"{len(by_name[HEALTHZ_NAME])} healthz), 0 failures", flush=True)
    return figures


def _idle_workers(data_dir: Path) -> int:
    """Live workers with no current job, read straight from the embedded SQLite database."""
    try:
        with sqlite3.connect(f"file:{data_dir / 'qlora.db'}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT count(*) FROM workers WHERE alive AND current_job IS NULL").fetchone()
    except sqlite3.Error:
        return 0  # not migrated yet, or a writer holds the lock: ask again
    return int(row[0])


def _wait_until(predicate: Any, what: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def create_to_first_step(work: Path) -> float:
    """Phase 2: `qlora serve` with its worker, a warm-up job, then the measured job; returns seconds."""
    from qlora_core.testing import build_tiny_llama_dir  # torch: imported only for this phase

    data_dir = work / "data-worker"
    env = _service_env(data_dir)
    model_dir = build_tiny_llama_dir(work / "tiny-llama")
    subprocess.run(_bin("qlora") + ["models", "import", str(model_dir), "--id", TINY_MODEL_ID], env=env,
                   cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)
    service = Service(data_dir, with_worker=True)
    try:
        client = service.wait_ready()
        # `qlora serve` registers the bundled model in a side process (a GGUF dequantization, CPU
        # heavy): let it finish so it does not compete with the measured job.
        _wait_until(lambda: not service.group_running("ensure-bundled"), "the bundled model's registration")
        warm = _create_job(client, TINY_MODEL_ID, 12, {**TINY_QLORA, "max_steps": 1})
        warm = wait_for_job_status(client, warm.id, FINISHED_STATUSES, JOB_TIMEOUT_S, log_tail=service.log_tail)
        if warm.status != "succeeded":
            raise RuntimeError(f"warm-up job {warm.id} ended {warm.status}: {warm.error}\n{service.log_tail()}")
        _wait_until(lambda: _idle_workers(data_dir) >= 1, "an idle worker")
        print(f"[first-step] {service.url}: warm-up job {warm.id} succeeded; worker idle", flush=True)

        job = _create_job(client, TINY_MODEL_ID, 12, {**TINY_QLORA, "max_steps": 3})
        t0 = time.monotonic()
        deadline = t0 + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
            if any(e.type == "metrics" for e in events):
                seconds = time.monotonic() - t0
                break
            time.sleep(POLL_S)
        else:
            raise RuntimeError(f"no metrics event for {job.id} in {JOB_TIMEOUT_S:.0f} s:\n{service.log_tail()}")
        job = wait_for_job_status(client, job.id, FINISHED_STATUSES, JOB_TIMEOUT_S, log_tail=service.log_tail)
        print(f"[first-step] job {job.id}: first metrics event {seconds:.2f} s after create; ended {job.status}",
              flush=True)
        return seconds
    finally:
        service.stop()


def main(argv: list[str] | None = None) -> int:
    adopt_from_env()  # started by run_all or a harness: die with it (See Note: owned children)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50, help="concurrent locust users")
    parser.add_argument("--duration", type=int, default=20, help="seconds of load")
    parser.add_argument("--max-requests", type=int, default=50_000, help="stop the load after this many requests")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data dirs, logs and locust CSVs here")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="qlora-bench-api-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        figures = read_latency(work, args.users, args.duration, args.max_requests)
        figures["create_to_first_step_s"] = create_to_first_step(work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    order = ["jobs_get_p50_ms", "jobs_get_p99_ms", "healthz_p50_ms", "healthz_p99_ms", "p99_ratio", "rps",
             "create_to_first_step_s"]
    print(" ".join(f"{k}={figures[k]:.2f}" for k in order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
