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
checkpoint list. A run restarted from step 0 would be bitwise equal too, so each test also waits
until a checkpoint is complete on disk and listed by the API before it kills, and requires every
restarted run to report that it resumed from the newest complete checkpoint of its kill (0 only
for the kill that precedes the first checkpoint).

Killing "while a checkpoint is being written": the engine builds each checkpoint in a hidden
`.tmp-step-…` dir and renames it into place (qlora_core/checkpoint.py). The test watches the
job's checkpoint dir and SIGKILLs the worker as soon as a temp dir appears; on this machine a
tiny model's checkpoint takes ~50-100 ms to write, so the kill usually lands inside the write.
The test counts the kills that left a half-written dir behind (FIGURES
`checkpoint_write_kills`) and requires at least one over its tries; that dir is never resumed
from and is gone once the job succeeds. FIGURES `kills_survived` counts SIGKILLs only (not the
SIGSTOP of the hung holder), and only once the job has been checked to end as if uninterrupted.

The hung holder is frozen inside the computation of the step before a checkpoint step, so that
what it would do first on waking is publish that step and write that checkpoint; it must find
its lease gone and write nothing: no checkpoint (not even a temp dir), no event.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from qlora_core.checkpoint import checkpoint_name, list_checkpoints
from service.queue import make_celery
from service.settings import Settings
from tests.faults.faultkit import (CHECKPOINT_STEPS, MAX_STEPS, SseReader, assert_nothing_lost_nothing_twice, count,
                                   embedded_stack, listed_checkpoints, reference_run, run_start_points)
from tests.faults.stack import Stack, WorkerProcess

pytestmark = pytest.mark.slow

CHECKPOINT_WRITE_TRIES = 4
# After the holder has recorded the step before a checkpoint step, how long to wait before the
# SIGSTOP: about its lease check before the next step (a few ms of database writes), short against
# the step's computation (10-50 ms on this project's hosts), so that the freeze lands inside it.
FREEZE_DELAY_S = 0.003


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


def _wait_checkpoint(stack: Stack, job_id: str, step: int) -> None:
    """Wait until checkpoint `step` is complete on disk and listed by the API (its row follows the files)."""

    from service.db import FINISHED_STATUSES

    def published() -> bool:
        on_disk = step in [s for s, _ in list_checkpoints(stack.job_dir(job_id))]
        return on_disk and step in [c.step_number for c in listed_checkpoints(stack, job_id)]

    stack.wait_until(f"checkpoint {step} of {job_id}",
                     lambda: published() or stack.job_row(job_id).status in FINISHED_STATUSES, poll_s=0.01)
    assert published(), f"{job_id} ended without checkpoint {step}\n{stack.logs()}"


def _kill_holder_at_step(stack: Stack, job_id: str, step: int) -> tuple[WorkerProcess, int]:
    """SIGKILL the holder once the job has recorded `step`; returns it and the checkpoint step to resume from."""
    stack.wait_step(job_id, step)
    victim = _holder(stack, job_id)
    victim.kill()
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
    torn = temp_dirs() - stale
    return victim, _resume_point(stack, job_id), bool(torn)


def test_killed_worker_resumes_from_last_complete_checkpoint(fault_stack: Stack, fault_reference) -> None:  # type: ignore[no-untyped-def]
    """Kills before the first checkpoint, between checkpoints and inside a checkpoint write. Two
    workers run at all times: the survivor takes the job over, and the killed one is restarted
    under its own name (the same worker coming back). The job ends as if never interrupted, and
    every run after a kill resumed from the newest checkpoint complete at that kill."""
    stack = fault_stack
    stack.start_worker("w1")
    stack.start_worker("w2")
    job_id = stack.create_job(max_steps=MAX_STEPS, checkpoint_steps=CHECKPOINT_STEPS)
    sse = SseReader(stack, job_id)
    sse.start()
    resume_points: list[int] = []

    victim, at = _kill_holder_at_step(stack, job_id, 2)  # before any checkpoint: starts over
    assert at == 0, f"checkpoint {at} complete at step 2"
    resume_points.append(at)
    stack.start_worker(victim.name)
    _wait_checkpoint(stack, job_id, CHECKPOINT_STEPS)
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
    # Checkpoints are never deleted, so every kill after the first had checkpoint CHECKPOINT_STEPS or a newer one.
    assert all(at >= CHECKPOINT_STEPS for at in resume_points[1:]), resume_points
    job = assert_nothing_lost_nothing_twice(stack, job_id, MAX_STEPS, interruptions=len(resume_points),
                                            reference=fault_reference)
    assert half_written >= 1, "no kill landed inside a checkpoint write"
    # The first run started at step 0; each later one where the engine says it resumed from.
    assert run_start_points(stack, job_id) == [0, *resume_points], stack.messages(job_id)
    sse.join(60)
    # A client following the stream saw every step once, in order, across the kills.
    assert sse.metrics_steps() == list(range(1, MAX_STEPS + 1))
    assert sse.events[-1]["message"] == "The job has successfully completed"
    assert job.trained_tokens == fault_reference[0].trained_tokens
    count("kills_survived", len(resume_points))
    count("checkpoint_write_kills", half_written)
    stack.stop_workers()


def test_killed_worker_resumes_in_embedded_mode(tiny_model_dir: Path) -> None:
    """The same kill on SQLite + the serverless broker, once a checkpoint is complete: a restarted
    worker resumes from it and finishes the job."""
    with embedded_stack(tiny_model_dir) as stack:
        reference = reference_run(stack, MAX_STEPS, checkpoint_steps=CHECKPOINT_STEPS)
        job_id = stack.create_job(max_steps=MAX_STEPS, checkpoint_steps=CHECKPOINT_STEPS)
        stack.start_worker("w1")
        _wait_checkpoint(stack, job_id, CHECKPOINT_STEPS)
        _, at = _kill_holder_at_step(stack, job_id, CHECKPOINT_STEPS + 1)
        assert at >= CHECKPOINT_STEPS, at
        stack.start_worker("w1")
        assert_nothing_lost_nothing_twice(stack, job_id, MAX_STEPS, interruptions=1, reference=reference)
        assert run_start_points(stack, job_id) == [0, at], stack.messages(job_id)
        count("kills_survived")


def test_a_killed_dpo_job_resumes_exactly_with_its_reference_log_probs(fault_stack: Stack) -> None:
    """The fault guarantees hold for DPO jobs: killed after a checkpoint, the job resumes from it on
    another worker, keeps the reference log-probs the checkpoint holds (they are taken once, in the
    first run only), and ends bitwise equal to an uninterrupted DPO run."""
    stack = fault_stack
    reference = reference_run(stack, MAX_STEPS, dpo=True, checkpoint_steps=CHECKPOINT_STEPS)
    stack.start_worker("d1")
    stack.start_worker("d2")
    job_id = stack.create_job(max_steps=MAX_STEPS, dpo=True, checkpoint_steps=CHECKPOINT_STEPS)
    _wait_checkpoint(stack, job_id, CHECKPOINT_STEPS)
    victim, at = _kill_holder_at_step(stack, job_id, CHECKPOINT_STEPS + 2)
    assert at >= CHECKPOINT_STEPS, at
    stack.start_worker(victim.name)
    job = assert_nothing_lost_nothing_twice(stack, job_id, MAX_STEPS, interruptions=1, reference=reference)
    assert run_start_points(stack, job_id) == [0, at], stack.messages(job_id)
    assert sum("reference log-probs" in m for m in stack.messages(job_id)) == 1  # not retaken on resume
    metrics = [e.data for e in stack.events(job_id) if e.type == "metrics"]
    assert all("rewards/accuracies" in m for m in metrics)
    assert job.method.type == "dpo"
    count("kills_survived")
    stack.stop_workers()


DUPLICATE_STEPS = 1200  # the job the duplicates arrive for (see below)


def test_redelivered_message_does_nothing_while_the_job_is_held(fault_stack: Stack) -> None:
    """Duplicate "run job X" messages, consumed by a second live worker while the first trains
    the job, are skipped: one run, one attempt, no second "started" event."""
    stack = fault_stack
    a, b = stack.start_worker("dup-a"), stack.start_worker("dup-b")
    # Both consuming before the job exists: the holder runs one task at a time, so only the other
    # worker can take a duplicate while the job runs, and it takes them one after another, each in
    # a fresh pool child (max_tasks_per_child=1): Celery started the second child 0.5-4.3 s after
    # the first exited. The job must outlast that on the fastest host: 400 steps took ~4 s on an
    # AMD EPYC of CPU family 26, and the second duplicate was skipped after the job had finished.
    a.wait_ready()
    b.wait_ready()
    job_id = stack.create_job(max_steps=DUPLICATE_STEPS, checkpoint_steps=DUPLICATE_STEPS // 2)
    stack.wait_step(job_id, 2)
    app = make_celery(Settings(database_url=stack.database_url, broker_url=stack.env["QLORA_BROKER_URL"]))
    for _ in range(2):
        app.send_task("qlora.run_job", args=[job_id], queue="qlora", ignore_result=True)

    def skipped() -> int:
        return sum(w.log().count(f"job {job_id} is finished or held by another worker") for w in (a, b))

    stack.wait_until("both duplicates to be skipped", lambda: skipped() >= 2, timeout_s=120, poll_s=0.2)
    assert stack.job_row(job_id).status == "running"  # skipped while the job was held, not after
    assert_nothing_lost_nothing_twice(stack, job_id, DUPLICATE_STEPS, interruptions=0)
    stack.stop_workers()


def _steps_completed(stack: Stack, job_id: str) -> int:
    """The job's `progress.steps_completed`: the holder's last write of a step, after its metrics event."""
    return int((stack.job_row(job_id).progress or {}).get("steps_completed") or 0)


def _freeze_before_a_checkpoint(stack: Stack, held: WorkerProcess, job_id: str) -> tuple[int, int, bool]:
    """SIGSTOP `held` inside the computation of a checkpoint step (12, else 18), before its metrics
    are recorded: woken, it asks for its lease right before it would begin the checkpoint's write.

    If both aims miss (a machine too loaded or too fast to aim at a step), freeze it anywhere
    outside a checkpoint write instead. It may then be frozen between its lease check and the
    write's first file; woken, it writes the temp dir, asks again right before the rename, and
    must still publish nothing and leave no temp dir.

    Returns:
        (the checkpoint step it would have written next, the checkpoint step a takeover resumes
        from, whether an aim hit). Frozen, `held` has not begun a checkpoint write.
    """
    from worker.lease import parse_owner

    ckpt_dir = stack.job_dir(job_id) / "checkpoints"
    trainer_pid = 0
    for ckpt_step in (2 * CHECKPOINT_STEPS, 3 * CHECKPOINT_STEPS):
        stack.wait_until(f"step {ckpt_step - 1} of {job_id}",
                         lambda before=ckpt_step - 1: _steps_completed(stack, job_id) >= before, poll_s=0.002)
        time.sleep(FREEZE_DELAY_S)
        held.pause()
        trainer_pid = trainer_pid or parse_owner(stack.job_row(job_id).lease_owner or "")[2]
        started = [name for name in os.listdir(ckpt_dir) if checkpoint_name(ckpt_step) in name]
        # With the checkpoint step's metrics not yet recorded it has not asked for its lease for
        # the write (TrainingCallback.may_write comes after them); once they are, it may have.
        if max(stack.metrics_steps(job_id)) == ckpt_step - 1 and not started:
            return ckpt_step, ckpt_step - CHECKPOINT_STEPS, True
        held.resume()  # too late; paused for milliseconds, far inside its lease, so it goes on as before
    while _steps_completed(stack, job_id) < MAX_STEPS - 1:
        held.pause()
        # Outside a write: no temp dir, and every complete checkpoint on disk already has its row
        # (a holder frozen between the two would log "written" for a checkpoint it made before).
        on_disk = {s for s, _ in list_checkpoints(stack.job_dir(job_id))}
        if not _temp_dirs_of(stack.job_dir(job_id), trainer_pid) and on_disk <= {
                c.step_number for c in listed_checkpoints(stack, job_id)}:
            resume_from = max(on_disk, default=0)  # what a takeover resumes from (the holder is frozen)
            return resume_from + CHECKPOINT_STEPS, resume_from, False
        held.resume()
        time.sleep(0.005)
    raise AssertionError(f"the job ended before the holder could be frozen outside a write\n{stack.logs()}")


def _temp_dirs_of(job_dir: Path, pid: int) -> set[str]:
    """The temp dirs process `pid` is writing a checkpoint or the final adapter in (qlora_core/checkpoint.py)."""
    found = set()
    for parent in (job_dir, job_dir / "checkpoints"):
        try:
            found |= {name for name in os.listdir(parent) if name.startswith(".tmp-") and name.endswith(f"-{pid}")}
        except FileNotFoundError:
            continue
    return found


def test_hung_holder_is_taken_over_after_its_lease_expires(fault_stack: Stack, fault_reference) -> None:  # type: ignore[no-untyped-def]
    """SIGSTOP the worker holding a job (it stops heart-beating but its process lives): another
    worker takes the job over once the lease expires (QLORA_LEASE_S=6), resumes it from the last
    checkpoint and finishes it; the holder, woken up just before it would write a checkpoint,
    finds its lease gone and writes nothing: no checkpoint, not even a temp dir, and no event.
    Frozen elsewhere (when the aim misses) it may begin a write, but publishes nothing."""
    from worker.lease import parse_owner

    stack = fault_stack
    held = stack.start_worker("hung")
    job_id = stack.create_job(max_steps=MAX_STEPS, checkpoint_steps=CHECKPOINT_STEPS)
    ckpt_step, resume_from, aimed = _freeze_before_a_checkpoint(stack, held, job_id)
    owner = stack.job_row(job_id).lease_owner
    assert owner.startswith(held.hostname + "|")
    trainer_pid = parse_owner(owner)[2]  # the job child, whose pid names its temp dirs
    rescuer = stack.start_worker("rescuer")
    stack.wait_until("the takeover", lambda: (stack.job_row(job_id).lease_owner or "").startswith(rescuer.hostname)
                     or stack.job_row(job_id).status == "succeeded", timeout_s=120, poll_s=0.2)
    mark = len(held.log())
    held.resume()
    begun: set[str] = set()

    def woken_holder_stopped() -> bool:
        begun.update(_temp_dirs_of(stack.job_dir(job_id), trainer_pid))  # a checkpoint write lasts ~50-100 ms
        return "'lease_lost'" in held.log()[mark:]

    stack.wait_until("the old holder to stop", woken_holder_stopped, timeout_s=60, poll_s=0.002)
    woken = held.log()[mark:]
    assert f"lost the lease on {job_id}" in woken
    # Woken up, it wrote no checkpoint (it would have written checkpoint `ckpt_step` next) ...
    if aimed:
        assert not begun, f"the woken holder began writing {sorted(begun)}"
    assert not _temp_dirs_of(stack.job_dir(job_id), trainer_pid), "the woken holder left a temp dir"
    assert not re.findall(r"checkpoint \S+ written", woken), woken
    assert_nothing_lost_nothing_twice(stack, job_id, MAX_STEPS, interruptions=1, reference=fault_reference)
    # ... and no event: not the note a run leaves when it stops ("stopped at step N of M").
    assert not [m for m in stack.messages(job_id) if m.startswith("stopped at step")], stack.messages(job_id)
    assert run_start_points(stack, job_id) == [0, resume_from], stack.messages(job_id)
    stack.stop_workers()
