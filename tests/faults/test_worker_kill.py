"""A worker killed mid-job, or hung, loses nothing and never trains a job twice at once.

Real processes throughout: a uvicorn API, `qlora worker` Celery processes (parent + prefork job
child), a private PostgreSQL and a private Redis (tests/faults/stack.py), and the embedded mode
(SQLite + kombu's `sqla+sqlite` broker) for one kill. A kill is SIGKILL to the worker's whole
process group, parent and child at once: no shutdown code runs, the Celery message is never
acknowledged, and the job's lease names a process that no longer exists.

What happens to the steps between the last checkpoint and a kill: their metrics events were
already recorded, so the resumed run replays those steps (exactly, see Note: exact resume in
qlora_core/train.py) and their replayed events are dropped by the events' `dedup_key`: the job
shows every step once, none missing, and the first-recorded values stand. The replayed steps'
values are the same anyway, which `test_killed_worker_*` checks through the final adapter: it is
bitwise equal to an uninterrupted run of the same job, and so are `trained_tokens` and the
checkpoint list.

Killing "while a checkpoint is being written": the engine builds each checkpoint in a hidden
`.tmp-step-…` dir and renames it into place (qlora_core/checkpoint.py). The test watches the
job's checkpoint dir and SIGKILLs the worker as soon as a temp dir appears; on this machine a
tiny model's checkpoint takes ~50-100 ms to write, so the kill usually lands inside the write.
The test counts the kills that left a half-written dir behind (FIGURES
`checkpoint_write_kills`) and requires at least one over its tries; that dir is never resumed
from and is gone once the job succeeds.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from qlora_core.checkpoint import list_checkpoints
from service.queue import make_celery
from service.settings import Settings
from tests.faults.faultkit import (CHECKPOINT_STEPS, MAX_STEPS, SseReader, assert_nothing_lost_nothing_twice, count,
                                   embedded_stack, reference_run, resumed_from_steps)
from tests.faults.stack import Stack, WorkerProcess

pytestmark = pytest.mark.slow

CHECKPOINT_WRITE_TRIES = 4


def _holder_or_none(stack: Stack, job_id: str) -> WorkerProcess | None:
    """The running worker one of whose processes holds the job's lease (matched by pid: a
    restarted worker has the same name as the dead holder whose lease it may still show)."""
    from worker.lease import parse_owner

    parsed = parse_owner(stack.job_row(job_id).lease_owner or "")
    if parsed is None:
        return None
    for w in stack.workers:
        if w.running and parsed[2] in w.group_pids():
            return w
    return None


def _holder(stack: Stack, job_id: str) -> WorkerProcess:
    w = _holder_or_none(stack, job_id)
    if w is None:
        raise AssertionError(f"no running worker holds {job_id}\n{stack.logs()}")
    return w


def _resume_point(stack: Stack, job_id: str) -> int:
    done = list_checkpoints(stack.job_dir(job_id))
    return done[-1][0] if done else 0


def _kill_holder_at_step(stack: Stack, job_id: str, step: int) -> tuple[WorkerProcess, int]:
    """SIGKILL the holder once the job has recorded `step`; returns it and the checkpoint step to resume from."""
    stack.wait_step(job_id, step)
    victim = _holder(stack, job_id)
    victim.kill()
    count("kills_survived")
    return victim, _resume_point(stack, job_id)


def _kill_holder_during_checkpoint_write(stack: Stack, job_id: str) -> tuple[WorkerProcess, int, bool]:
    """SIGKILL the holder as soon as a new checkpoint temp dir appears.

    Returns:
        (the killed worker, checkpoint step to resume from, whether a half-written checkpoint was left).
    """
    ckpt_dir = stack.job_dir(job_id) / "checkpoints"

    def temp_dirs() -> set[str]:
        try:
            return {name for name in os.listdir(ckpt_dir) if name.startswith(".tmp-step-")}
        except FileNotFoundError:
            return set()

    stale = temp_dirs()  # left by an earlier kill; the next run removes them at start-up
    deadline = time.monotonic() + 240
    stack.wait_until("a worker to hold the job", lambda: _holder_or_none(stack, job_id) is not None)
    victim = _holder(stack, job_id)  # found first, so that the kill follows the temp dir within a millisecond
    while not temp_dirs() - stale:
        if time.monotonic() > deadline or not victim.running:
            raise AssertionError(f"no checkpoint write seen\n{stack.logs()}")
        time.sleep(0.001)
    victim.kill()
    count("kills_survived")
    torn = temp_dirs() - stale
    return victim, _resume_point(stack, job_id), bool(torn)


def test_killed_worker_resumes_from_last_complete_checkpoint(fault_stack: Stack, fault_reference) -> None:  # type: ignore[no-untyped-def]
    """Kills before the first checkpoint, between checkpoints and inside a checkpoint write. Two
    workers run at all times: the survivor takes the job over, and the killed one is restarted
    under its own name (the same worker coming back). The job ends as if never interrupted."""
    stack = fault_stack
    stack.start_worker("w1")
    stack.start_worker("w2")
    job_id = stack.create_job(max_steps=MAX_STEPS, checkpoint_steps=CHECKPOINT_STEPS)
    sse = SseReader(stack, job_id)
    sse.start()
    resume_points: list[int] = []

    victim, at = _kill_holder_at_step(stack, job_id, 2)  # before any checkpoint: starts over
    resume_points.append(at)
    stack.start_worker(victim.name)
    victim, at = _kill_holder_at_step(stack, job_id, CHECKPOINT_STEPS + 2)
    resume_points.append(at)
    stack.start_worker(victim.name)
    half_written = 0
    for _ in range(CHECKPOINT_WRITE_TRIES):
        if half_written or _resume_point(stack, job_id) >= MAX_STEPS:
            break
        victim, at, torn = _kill_holder_during_checkpoint_write(stack, job_id)
        resume_points.append(at)
        half_written += torn
        stack.start_worker(victim.name)
    count("checkpoint_write_kills", half_written)
    job = assert_nothing_lost_nothing_twice(stack, job_id, MAX_STEPS, interruptions=len(resume_points),
                                            reference=fault_reference)
    assert half_written >= 1, "no kill landed inside a checkpoint write"
    # Each run resumed from the newest *complete* checkpoint at the moment of its kill (0: none).
    resumed = resumed_from_steps(stack, job_id)
    assert resumed == [s for s in resume_points if s > 0], (resumed, resume_points)
    sse.join(60)
    # A client following the stream saw every step once, in order, across the kills.
    assert sse.metrics_steps() == list(range(1, MAX_STEPS + 1))
    assert sse.events[-1]["message"] == "The job has successfully completed"
    assert job.trained_tokens == fault_reference[0].trained_tokens
    stack.stop_workers()


def test_killed_worker_resumes_in_embedded_mode(tiny_model_dir: Path) -> None:
    """The same kill on SQLite + the serverless broker: a restarted worker finishes the job."""
    with embedded_stack(tiny_model_dir) as stack:
        reference = reference_run(stack, MAX_STEPS, checkpoint_steps=CHECKPOINT_STEPS)
        job_id = stack.create_job(max_steps=MAX_STEPS, checkpoint_steps=CHECKPOINT_STEPS)
        stack.start_worker("w1")
        _, resume_step = _kill_holder_at_step(stack, job_id, CHECKPOINT_STEPS + 1)
        stack.start_worker("w1")
        assert_nothing_lost_nothing_twice(stack, job_id, MAX_STEPS, interruptions=1, reference=reference)
        assert resumed_from_steps(stack, job_id) == ([resume_step] if resume_step else [])


def test_redelivered_message_does_nothing_while_the_job_is_held(fault_stack: Stack) -> None:
    """Duplicate "run job X" messages, consumed by a second live worker while the first trains
    the job, are skipped: one run, one attempt, no second "started" event."""
    stack = fault_stack
    a, b = stack.start_worker("dup-a"), stack.start_worker("dup-b")
    job_id = stack.create_job(max_steps=400, checkpoint_steps=200)
    stack.wait_step(job_id, 2)
    app = make_celery(Settings(database_url=stack.database_url, broker_url=stack.env["QLORA_BROKER_URL"]))
    for _ in range(2):
        app.send_task("qlora.run_job", args=[job_id], queue="qlora", ignore_result=True)

    def skipped() -> int:
        return sum(w.log().count(f"job {job_id} is finished or held by another worker") for w in (a, b))

    stack.wait_until("both duplicates to be skipped", lambda: skipped() >= 2, timeout_s=120, poll_s=0.2)
    assert stack.job_row(job_id).status == "running"  # skipped while the job was held, not after
    assert_nothing_lost_nothing_twice(stack, job_id, 400, interruptions=0)
    stack.stop_workers()


def test_hung_holder_is_taken_over_after_its_lease_expires(fault_stack: Stack, fault_reference) -> None:  # type: ignore[no-untyped-def]
    """SIGSTOP the worker holding a job (it stops heart-beating but its process lives): another
    worker takes the job over once the lease expires (QLORA_LEASE_S=6) and finishes it; the
    holder, woken up, finds its lease gone and stops without publishing anything."""
    stack = fault_stack
    held = stack.start_worker("hung")
    job_id = stack.create_job(max_steps=MAX_STEPS, checkpoint_steps=CHECKPOINT_STEPS)
    stack.wait_step(job_id, CHECKPOINT_STEPS + 2)
    held.pause()
    owner = stack.job_row(job_id).lease_owner
    assert owner.startswith(held.hostname + "|")
    rescuer = stack.start_worker("rescuer")
    stack.wait_until("the takeover", lambda: (stack.job_row(job_id).lease_owner or "").startswith(rescuer.hostname)
                     or stack.job_row(job_id).status == "succeeded", timeout_s=120, poll_s=0.2)
    mark = len(held.log())
    held.resume()
    count("kills_survived")
    assert_nothing_lost_nothing_twice(stack, job_id, MAX_STEPS, interruptions=1, reference=fault_reference)
    stack.wait_until("the old holder to stop", lambda: "'lease_lost'" in held.log()[mark:], timeout_s=60, poll_s=0.2)
    woken = held.log()[mark:]
    assert f"lost the lease on {job_id}" in woken
    # Woken up, it published at most the checkpoint it was writing when it froze, and nothing after.
    assert len(re.findall(r"checkpoint \S+ written", woken)) <= 1, woken
    stack.stop_workers()
