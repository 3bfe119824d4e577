"""The bridge from the training loop to the database: `DbCallback` turns `qlora_core.train`'s
callbacks into job events, checkpoint rows, progress and cooperative cancellation.

`qlora_core` knows nothing of the service (it imports neither api nor worker); the worker hands
`train()` this callback. It is the job-side half of Together's fine-tuning progress
(`steps_completed, total_steps, seconds_remaining`) and OpenAI's metrics events and checkpoints.
Imported only inside a training child: `qlora_core.train` imports torch.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from qlora_core.train import TrainingCallback
from service.db import Checkpoint, Job, new_id, now
from worker.events import add_event

log = logging.getLogger(__name__)

_jobs = Job.__table__
_checkpoints = Checkpoint.__table__

# should_stop is asked every optimizer step; the database at most once per this many seconds.
CANCEL_POLL_S = 1.0
# What a metrics event's `data` and a checkpoint's `metrics` carry: OpenAI's names, and at the last
# step of a run with a validation file the base model's full-file figures beside the fine-tuned
# model's (qlora_core/evaluate.py, See Note: full validation).
_REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")  # DPO (qlora_core/dpo.py)
METRIC_KEYS = (
    "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
    "full_valid_loss", "full_valid_mean_token_accuracy", "base_full_valid_loss", "base_full_valid_mean_token_accuracy",
    *_REWARDS, *(f"valid_{k}" for k in _REWARDS), *(f"full_valid_{k}" for k in _REWARDS),
)  # fmt: skip


class LeaseLost(RuntimeError):
    """This process no longer holds the job's lease: another worker took the job over."""


class LeaseKeeper(threading.Thread):
    """Renews the job's lease every `heartbeat_s` while the job runs (a daemon thread in the child).

    If a renewal finds the lease gone (it expired while this process stalled and another worker
    took the job), `lost` is set and the training loop stops at its next step.

    # Note: stalled holders. A process frozen past its lease (SIGSTOP, a swapping machine, a VM
    # paused by its host) wakes up in the middle of a step with its lease already taken over. The
    # keeper thread and the training thread resume together, so waiting for the keeper's next
    # renewal would let the training thread publish the step it was in: a metrics event and a
    # checkpoint written beside the new holder's. `confirm()` closes that window: when the last
    # good renewal is older than two heartbeats, it renews synchronously before the caller
    # writes anything, and reports the lease lost if that fails. A renewal counts from when it was
    # sent, not from when its answer came back: a process frozen while waiting for that answer
    # would otherwise wake up trusting a lease that expired while it was stopped.
    """

    def __init__(self, engine: Engine, job_id: str, owner: str, lease_s: int, heartbeat_s: float) -> None:
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.engine, self.job_id, self.owner = engine, job_id, owner
        self.lease_s, self.heartbeat_s = lease_s, heartbeat_s
        self.lost = threading.Event()
        self._stop_event = threading.Event()
        self.last_renewed = time.monotonic()  # the lease was just acquired

    def run(self) -> None:
        from worker.lease import renew

        while not self._stop_event.wait(self.heartbeat_s):
            try:
                sent = time.monotonic()  # See Note: stalled holders (counted from sending)
                if not renew(self.engine, self.job_id, self.owner, self.lease_s):
                    log.warning("lost the lease on %s", self.job_id)
                    self.lost.set()
                    return
                self.last_renewed = max(self.last_renewed, sent)
            except SQLAlchemyError as e:  # a database blip: keep trying until the lease actually expires
                log.warning("lease renewal of %s failed: %s", self.job_id, e)
            except Exception:  # a bug: stop the run rather than train on without a lease
                log.exception("lease keeper of %s crashed", self.job_id)
                self.lost.set()
                return

    def confirm(self) -> bool:
        """True while this process still holds the lease; see Note: stalled holders."""
        from worker.lease import renew

        if self.lost.is_set():
            return False
        stale_for = time.monotonic() - self.last_renewed
        if stale_for <= 2 * self.heartbeat_s:
            return True
        sent = time.monotonic()
        try:
            held = renew(self.engine, self.job_id, self.owner, self.lease_s)
        except SQLAlchemyError as e:  # cannot tell: hold on until the lease would have expired
            log.warning("lease check of %s failed: %s", self.job_id, e)
            held = stale_for <= self.lease_s
        if held:
            self.last_renewed = max(self.last_renewed, sent)
            if time.monotonic() - sent > 2 * self.heartbeat_s:  # stalled while asking: ask again
                return self.confirm()
            return True
        log.warning("lost the lease on %s (this process stalled for %.0f s)", self.job_id, stale_for)
        self.lost.set()
        return False

    def stop(self) -> None:
        self._stop_event.set()


class DbCallback(TrainingCallback):
    """Records a training run in the job's rows; see the module docstring.

    Args:
        engine: the service database.
        job_id: the job being trained.
        fine_tuned_model: the job's model name, prefix of every checkpoint's name.
        tenant_id: owner of the checkpoints.
        artifacts_dir: root that checkpoint paths are stored relative to.
        lease: the LeaseKeeper of this run (its `lost` flag stops training).
        deadline: Unix time after which `should_stop` stops the run (job time limit).
        storage: the store each checkpoint is published to before its row is written (None: local only).
    """

    def __init__(
        self,
        engine: Engine,
        job_id: str,
        fine_tuned_model: str,
        tenant_id: str,
        artifacts_dir: Path,
        lease: LeaseKeeper | None,
        deadline: float,
        storage: Any = None,
    ) -> None:
        self.engine, self.job_id = engine, job_id
        self.storage = storage  # service.objectstore.Storage: where checkpoints are published
        self.fine_tuned_model, self.tenant_id = fine_tuned_model, tenant_id
        self.artifacts_dir = Path(artifacts_dir)
        self.lease, self.deadline = lease, deadline
        self.total_steps = 0
        self.first_step = 0
        self.t_start = time.monotonic()
        self.stop_reason: str | None = None  # "cancelled" | "time_limit" | "lease_lost"
        self._last_poll = 0.0
        self.first_step_at: float | None = None  # wall time of the first metrics (for measurements)

    # --- TrainingCallback -------------------------------------------------------------------
    def on_message(self, level: str, message: str) -> None:
        if not self.may_write(-1):  # a holder that lost the lease says nothing more in the job's events
            log.info("not recorded (lease lost on %s): %s", self.job_id, message)
            return
        add_event(self.engine, self.job_id, message, level=level if level in ("info", "warn", "error") else "info")

    def on_start(self, info: dict) -> None:
        self.total_steps = int(info.get("total_steps") or 0)
        self.first_step = int(info.get("resumed_from_step") or 0)
        self.t_start = time.monotonic()
        progress = {"steps_completed": self.first_step, "total_steps": self.total_steps, "seconds_remaining": None}
        with self.engine.begin() as conn:
            conn.execute(update(_jobs).where(_jobs.c.id == self.job_id).values(progress=progress))

    def on_metrics(self, step: int, metrics: dict) -> None:
        self._check_lease()  # before anything of this step is published (See Note: stalled holders)
        if self.first_step_at is None:
            self.first_step_at = time.time()
        data: dict[str, Any] = {"step": step}
        for key in METRIC_KEYS:
            if metrics.get(key) is not None and math.isfinite(float(metrics[key])):
                data[key] = float(metrics[key])
        data["total_steps"] = self.total_steps
        message = f"Step {step}/{self.total_steps}: training loss={data.get('train_loss', float('nan')):.4f}"
        if "valid_loss" in data:
            message += f", validation loss={data['valid_loss']:.4f}"
        if "full_valid_loss" in data:
            message += f", full validation loss={data['full_valid_loss']:.4f}"
            if "base_full_valid_loss" in data:
                message += f" (base model: {data['base_full_valid_loss']:.4f})"
        add_event(self.engine, self.job_id, message, type="metrics", data=data, dedup_key=f"metrics:{step}")
        remaining = self._seconds_remaining(step)
        progress = {"steps_completed": step, "total_steps": self.total_steps, "seconds_remaining": remaining}
        values: dict[str, Any] = {"progress": progress}
        if remaining is not None:
            values["estimated_finish"] = now() + remaining
        if metrics.get("trained_tokens") is not None:
            values["trained_tokens"] = int(metrics["trained_tokens"])
        with self.engine.begin() as conn:
            conn.execute(update(_jobs).where(_jobs.c.id == self.job_id).values(**values))

    def on_checkpoint(self, step: int, path: Path, metrics: dict) -> None:
        self._check_lease()
        path = Path(path)
        root = self.artifacts_dir.resolve()
        rel = path.resolve().relative_to(root).as_posix() if path.resolve().is_relative_to(root) else str(path)
        state = path / "state.pt"
        row = {
            "id": new_id("ftckpt"),
            "job_id": self.job_id,
            "tenant_id": self.tenant_id,
            "step_number": step,
            "metrics": {"step": step, **{k: float(v) for k, v in metrics.items() if k in METRIC_KEYS and v is not None}},
            "fine_tuned_model_checkpoint": f"{self.fine_tuned_model}:ckpt-step-{step}",
            "adapter_path": rel,
            "state_path": (rel + "/state.pt") if state.exists() else None,
            "created_at": now(),
        }
        if self.storage is not None and path.resolve().is_relative_to(root):
            # A row names only what the store holds: a job taken over on another host resumes from it.
            self.storage.publish_tree("artifacts", rel)
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(_checkpoints).values(**row))
        except IntegrityError:  # a resumed run saved this step again: the first row stands
            log.info("checkpoint step %d of %s already recorded", step, self.job_id)

    def on_resumed(self, step: int, path: Path, metrics: dict) -> None:
        """Record the checkpoint this run resumed from if no row names it: its writer lost the lease
        after the checkpoint was complete on disk and before `on_checkpoint` (published and) recorded it."""
        with self.engine.connect() as conn:
            known = conn.execute(select(_checkpoints.c.id).where(
                _checkpoints.c.job_id == self.job_id, _checkpoints.c.step_number == step)).first()
        if known is None:
            log.info("recording checkpoint step %d of %s, resumed from but never recorded", step, self.job_id)
            self.on_checkpoint(step, path, metrics)

    def may_write(self, step: int) -> bool:
        """Only while the lease holds (See Note: stalled holders): asked right before a write."""
        if self.lease is not None and not self.lease.confirm():
            self.stop_reason = "lease_lost"
            return False
        return True

    def should_stop(self, step: int) -> bool:
        if self.stop_reason:
            return True
        if not self.may_write(step):  # the lease is gone
            return True
        if time.time() > self.deadline:
            self.stop_reason = "time_limit"
            return True
        t = time.monotonic()
        if t - self._last_poll < CANCEL_POLL_S:
            return False
        self._last_poll = t
        with self.engine.connect() as conn:
            row = conn.execute(
                select(_jobs.c.cancel_requested_at, _jobs.c.status).where(_jobs.c.id == self.job_id)
            ).one()
        if row.cancel_requested_at is not None or row.status == "cancelled":
            self.stop_reason = "cancelled"
            return True
        return False

    # --- helpers ----------------------------------------------------------------------------
    def _check_lease(self) -> None:
        """Raise LeaseLost (ending `train` at once) when another worker has taken the job over."""
        if self.lease is not None and not self.lease.confirm():
            self.stop_reason = "lease_lost"
            raise LeaseLost(f"job {self.job_id} was taken over by another worker")

    def _seconds_remaining(self, step: int) -> int | None:
        done = step - self.first_step
        if done <= 0 or not self.total_steps:
            return None
        rate = (time.monotonic() - self.t_start) / done  # seconds per step in this run
        return int(round(rate * max(self.total_steps - step, 0)))
