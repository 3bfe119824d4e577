"""For whoever starts `qlora serve` as a child process and waits for it: a free port, readiness,
a job reaching a status.

`make demo`, the end-to-end tests and the API latency benchmark all start the service the way a
user does and must not talk to it before `GET /readyz` answers 200 (database reachable, migrated;
api/routes/health.py). A child that exits while we wait is reported at once, with its log,
instead of after the timeout.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_ready(
    base_url: str,
    procs: Mapping[str, subprocess.Popen[bytes]],
    timeout_s: float,
    log_tail: Callable[[], str] = lambda: "",
    interval_s: float = 0.5,
) -> None:
    """Poll `base_url/readyz` until it answers 200.

    Args:
        base_url: e.g. "http://127.0.0.1:8000".
        procs: the processes serving it, by name; if one exits, waiting is over.
        timeout_s: how long to wait in all.
        log_tail: what to show when it fails (the service's log, usually).
        interval_s: pause between polls.

    Raises:
        RuntimeError: a process exited, or the service was not ready in time; the message
            carries `log_tail()`.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_tail()}")
        try:
            if httpx.get(base_url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    raise RuntimeError(f"{base_url} was not ready after {timeout_s:.0f} s:\n{log_tail()}")


def wait_for_job_status(
    client: Any,
    job_id: str,
    statuses: tuple[str, ...],
    timeout_s: float,
    log_tail: Callable[[], str] = lambda: "",
    interval_s: float = 0.5,
) -> Any:
    """Poll a fine-tuning job through the `openai` SDK until its status is one of `statuses`.

    Args:
        client: an `openai.OpenAI` client pointed at the service.
        job_id: the job to watch.
        statuses: the statuses that end the wait, e.g. the finished ones.
        timeout_s: how long to wait in all.
        log_tail: what to show when it times out (the service's log, usually).
        interval_s: pause between polls.

    Returns:
        The job object in one of `statuses`.

    Raises:
        RuntimeError: the job was not in one of `statuses` in time; the message carries `log_tail()`.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(interval_s)
    raise RuntimeError(f"job {job_id} not in {statuses} after {timeout_s:.0f} s:\n{log_tail()}")
