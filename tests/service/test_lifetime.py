"""service/lifetime.py: a child started with `owned_child_env` dies with its parent, however the parent dies.

Real processes: a parent Python process starts a child and prints its pid, then the test SIGKILLs the
parent (no code of it runs) and watches the child go. Both mechanisms are covered: Linux's death
signal (`adopt_from_env`, as `qlora serve` -> `qlora worker`) and the polling thread (as a Celery
prefork child uses).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = str(Path(__file__).resolve().parents[2])

CHILD = {
    "prctl": "from service.lifetime import adopt_from_env; adopt_from_env(); import time; time.sleep(120)",
    "thread": "import os, time; from service.lifetime import die_with_parent; "
              "die_with_parent(os.getppid(), thread_safe=True); time.sleep(120)",
}
PARENT = """
import os, subprocess, sys, time
from service.lifetime import owned_child_env
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=owned_child_env(dict(os.environ)))
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("how", ["prctl", "thread"])
def test_child_dies_when_its_parent_is_sigkilled(how):
    env = {**os.environ, "PYTHONPATH": REPO}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD[how]], env=env, stdout=subprocess.PIPE,
                              start_new_session=True)
    child_pid = int(parent.stdout.readline())
    try:
        time.sleep(1.0)  # the child is set up (imports done) and still running while its parent lives
        assert _alive(child_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child_pid), f"child {child_pid} outlived its SIGKILLed parent ({how})"
    finally:
        if _alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_the_claim_is_not_inherited(monkeypatch):
    """A grandchild started with the inherited environment must not think `serve` is its parent."""
    from service import lifetime

    monkeypatch.setenv(lifetime.OWNER_ENV, str(os.getppid()))  # our parent: the pytest runner's
    called = []
    monkeypatch.setattr(lifetime, "die_with_parent", lambda pid, **kw: called.append(pid))
    lifetime.adopt_from_env()
    assert called == [os.getppid()] and lifetime.OWNER_ENV not in os.environ
    lifetime.adopt_from_env()  # nothing to adopt the second time
    assert called == [os.getppid()]
