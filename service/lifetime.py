"""Children that die with their parent: `qlora serve` owns its worker, the worker its job child.

# Note: owned children. `qlora serve` starts its worker in a session of its own (so Ctrl-C reaches
# only `serve`, which then stops the worker in order). That also means a `serve` killed by SIGKILL,
# the OOM killer or a crashed terminal leaves the worker and its job child running as orphans, and
# a restarted `serve` then runs a second worker beside them. Nothing in the parent can run when it
# is SIGKILLed, so the children watch for it themselves:
#   * a process started with `OWNER_ENV` set asks Linux for a death signal (`prctl(PR_SET_PDEATHSIG)`,
#     delivered the moment its parent exits) and checks once that the parent is still the one that
#     started it (it may have died before the call);
#   * a Celery prefork child is forked by whichever worker thread runs the pool's upkeep, and
#     PR_SET_PDEATHSIG fires when the forking *thread* exits, so there (and where prctl does not
#     exist, off Linux) a daemon thread polls `os.getppid()` twice a second instead.
# The death signal is SIGKILL: a worker asked to stop warmly would wait for its job to finish, and
# a killed job resumes from its last checkpoint when a worker takes its lease again.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

OWNER_ENV = "QLORA_PARENT_PID"  # set by a parent for the one process it starts; read and removed there
_PR_SET_PDEATHSIG = 1


def _prctl_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return False
    return libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0


def _die(sig: int) -> None:
    os.kill(os.getpid(), sig)


def watch_parent(parent_pid: int, sig: int = signal.SIGKILL, poll_s: float = 0.5) -> threading.Thread:
    """Start a daemon thread that sends `sig` to this process once its parent is no longer `parent_pid`.

    Args:
        parent_pid: the pid of the parent this process must not outlive.
        sig: what to die of (SIGKILL: no shutdown code, as if killed with the parent).
        poll_s: how often to look.

    Returns:
        The started thread.
    """

    def run() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        log.warning("parent %d is gone; exiting with it", parent_pid)
        _die(sig)

    thread = threading.Thread(target=run, name="parent-watch", daemon=True)
    thread.start()
    return thread


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL, thread_safe: bool = True) -> None:
    """Make this process die with its parent `parent_pid` (See Note: owned children).

    Args:
        parent_pid: the parent this process must not outlive.
        sig: the death signal.
        thread_safe: the parent may have forked this process from a thread that exits before it
            does: watch with a thread instead of prctl's death signal.
    """
    if thread_safe or not _prctl_death_signal(sig):
        watch_parent(parent_pid, sig)
    if os.getppid() != parent_pid:  # the parent died before we asked
        _die(sig)


def adopt_from_env() -> None:
    """In a process started by an owner (`OWNER_ENV` set): die with it, and do not pass the claim on."""
    value = os.environ.pop(OWNER_ENV, None)
    if value is None:
        return
    try:
        parent_pid = int(value)
    except ValueError:
        log.warning("ignoring %s=%r: not a pid", OWNER_ENV, value)
        return
    die_with_parent(parent_pid, thread_safe=False)


def owned_child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child that must die with this process (read by `adopt_from_env` in the child)."""
    return {**env, OWNER_ENV: str(os.getpid())}
