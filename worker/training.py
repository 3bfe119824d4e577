"""The `running` step of a job: call `qlora_core.train.train` and publish what it produced.

On completion the adapter is packed as `artifacts_dir/jobs/<id>/adapter.tar.gz` (the PEFT files
at the archive's root, so `tar xzf` + `PeftModel.from_pretrained(dir)` works), the job gets
an OpenAI-shaped model name `ft:<base>:<tenant>:<suffix>:<id>`, a `fine_tuned` Model row is
listed for the tenant, and the job's results CSV becomes a file of the tenant (worker/results.py).
Imported only inside a training child (torch).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select, update

from service.db import Checkpoint, File, Job, JobEvent, Model, Tenant
from service.objectstore import get_storage
from service.settings import Settings
from worker.errors import JobFailed
from worker.events import event_values

log = logging.getLogger(__name__)

_models = Model.__table__


def job_output_dir(settings: Settings, job_id: str) -> Path:
    """`artifacts_dir/jobs/<job_id>`: the job's checkpoints, final adapter and archive."""
    return Path(settings.artifacts_dir) / "jobs" / job_id


def fine_tuned_model_name(base: str, tenant: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's shape `ft:BASE:ORG:SUFFIX:ID` (suffix may be empty); `:` is kept out of the parts."""

    def clean(s: str) -> str:
        return re.sub(r"[:\s]+", "-", s)

    short = job_id.split("-", 1)[-1]
    return f"ft:{clean(base)}:{clean(tenant)}:{clean(suffix or '')}:{short}"


def train_job(engine: Engine, settings: Settings, job: Any, owner: str, lease: Any, deadline: float) -> str:
    """Train `job` (a job row in status running) and record the result.

    Returns:
        "succeeded", "cancelled", "time_limit" or "lease_lost".

    Raises:
        JobFailed: out of memory, bad data, an unknown model.
        Exception: anything unexpected (the task records it as `internal_error`).
    """
    from qlora_core.checkpoint import list_checkpoints
    from qlora_core.config import TrainConfig
    from qlora_core.store import ModelStore
    from service.objectstore import model_remote
    from qlora_core.train import OutOfMemory, train
    from qlora_core.validate import DatasetError
    from worker.runner import DbCallback, LeaseLost
    from worker.validation import file_path

    try:
        model_dir = ModelStore(settings.models_dir, remote=model_remote(settings)).model_path(job.model)
    except KeyError:
        raise JobFailed("model_not_found", f"Model {job.model} is not in the model store", "model") from None
    train_file = file_path(engine, settings, job.training_file, job.tenant_id, "training_file")
    valid_file = (
        file_path(engine, settings, job.validation_file, job.tenant_id, "validation_file") if job.validation_file else None
    )
    with engine.connect() as conn:
        tenant_name = conn.execute(select(Tenant.__table__.c.name).where(Tenant.__table__.c.id == job.tenant_id)).scalar()
    ft_name = fine_tuned_model_name(job.model, tenant_name or job.tenant_id, job.suffix, job.id)
    out_dir = job_output_dir(settings, job.id)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = get_storage(settings)
    restore_last_checkpoint(engine, storage, job.id, out_dir)
    init_adapter = _init_adapter(storage, job, has_checkpoint=bool(list_checkpoints(out_dir)))
    callback = DbCallback(engine, job.id, ft_name, job.tenant_id, Path(settings.artifacts_dir), lease, deadline,
                          storage=storage)
    config = TrainConfig.from_dict(job.config)
    cuda_oom = _cuda_oom()
    try:
        result = train(
            model_dir=model_dir,
            train_file=train_file,
            output_dir=out_dir,
            config=config,
            valid_file=valid_file,
            callback=callback,
            resume=True,
            init_adapter=init_adapter,
        )
    except LeaseLost:  # another worker holds the job now; it publishes, this process only stops
        log.warning("job %s: stopped, its lease was taken over", job.id)
        return "lease_lost"
    except OutOfMemory as e:  # its message already says what to lower
        raise JobFailed("out_of_memory", str(e).strip().splitlines()[0]) from e
    except (MemoryError, cuda_oom) as e:
        raise JobFailed(
            "out_of_memory",
            "Training ran out of memory: lower batch_size, max_seq_length or lora_r, or turn on gradient_checkpointing.",
        ) from e
    except DatasetError as e:
        raise JobFailed("invalid_training_file", str(e).splitlines()[0] if str(e) else "invalid training data", "training_file") from e

    if result.status != "completed":
        return callback.stop_reason or "cancelled"
    if result.adapter_dir is None:
        raise RuntimeError("training completed without a final adapter")
    from service.storage import build_adapter_archive, job_archive_rel
    from worker.results import write_results_file

    # Built once here so the download endpoint streams a finished file (service.storage packs
    # only the PEFT files, at the archive root). The job and model rows point at the directory.
    build_adapter_archive(Path(result.adapter_dir), out_dir / "adapter.tar.gz")
    rel = storage.rel_of("artifacts", Path(result.adapter_dir))
    storage.publish_tree("artifacts", rel)  # in the store before any row names it
    storage.publish_file("artifacts", job_archive_rel(job.id))
    finished = int(time.time())
    progress = {"steps_completed": result.steps, "total_steps": result.total_steps, "seconds_remaining": 0}
    # Note: one results file. The CSV's bytes are stored first, under a fresh id; its `files` row
    # is inserted in the transaction below, the one that moves the job from running to succeeded,
    # so exactly one process ever commits a results file for a job (the guarded UPDATE matches
    # once). Whatever does not commit (a lost lease, an error, an exception unwinding a dying
    # process) removes its bytes; a process killed outright between the two leaves only an
    # unreferenced file, never a second row, and the job's next holder writes its own.
    results = write_results_file(engine, storage, job.id, job.tenant_id)
    published = False
    try:
        published = _publish(engine, job, owner, ft_name, result, rel, finished, progress, results)
    finally:
        if not published:
            storage.delete("files", results["storage_path"])
    if published and storage.remote:  # everything is in the store now; this host keeps no copy
        storage.drop_local("artifacts", f"jobs/{job.id}")
        storage.drop_local("files", results["storage_path"])
    return "succeeded" if published else "lease_lost"


def _init_adapter(storage: Any, job: Any, has_checkpoint: bool) -> Path | None:
    """The adapter of the fine-tuned model the job continues, on this host (None for a job on a base model).

    A job that already has a checkpoint resumes from it and no longer needs the starting adapter.

    Raises:
        JobFailed: `model_not_found` when the model's adapter is gone and nothing else to start from.
    """
    from service.storage import ArtifactMissing, UnsafePath

    if not job.init_adapter:
        return None
    try:
        return storage.fetch_tree("artifacts", job.init_adapter)
    except (ArtifactMissing, UnsafePath):
        if has_checkpoint:
            return None
        raise JobFailed("model_not_found", f"The adapter of {job.requested_model}, which this job continues, "
                        "is no longer in the artifact store (was the model deleted?)", "model") from None


def restore_last_checkpoint(engine: Engine, storage: Any, job_id: str, out_dir: Path) -> Path | None:
    """Fetch the job's last recorded checkpoint into `out_dir` unless this host has it or a later one.

    A job taken over on another host (its first worker's host gone) finds here what that worker
    published, and `train(resume=True)` goes on from it. Locally this only finds what is on disk.

    Returns:
        The checkpoint directory fetched, or None when there was nothing to fetch.
    """
    from qlora_core.checkpoint import latest_checkpoint, list_checkpoints

    if not storage.remote:
        return None
    with engine.connect() as conn:
        row = conn.execute(select(Checkpoint.__table__.c.step_number, Checkpoint.__table__.c.adapter_path)
                           .where(Checkpoint.__table__.c.job_id == job_id)
                           .order_by(Checkpoint.__table__.c.step_number.desc()).limit(1)).first()
    if row is None:
        return None
    have = {step for step, _ in list_checkpoints(out_dir)}
    if have and max(have) >= row.step_number:
        return None
    path = storage.fetch_tree("artifacts", row.adapter_path, cache=False)
    if latest_checkpoint(out_dir) != path:
        raise RuntimeError(f"checkpoint {row.adapter_path} was fetched to {path}, outside {out_dir}")
    log.info("job %s: fetched its checkpoint at step %d from the store", job_id, row.step_number)
    return path


def _publish(engine: Engine, job: Any, owner: str, ft_name: str, result: Any, rel: str, finished: int,
             progress: dict, results: dict) -> bool:
    """Make the job `succeeded` with its model row, results file and closing events, in one transaction.

    Returns:
        False (nothing written) when the job is no longer this owner's running job.
    """
    # The job row and its model row change together: a job is never succeeded without its model.
    jobs = Job.__table__
    with engine.begin() as conn:
        changed = conn.execute(
            update(jobs)
            .where(jobs.c.id == job.id, jobs.c.lease_owner == owner, jobs.c.status == "running")
            .values(
                status="succeeded",
                fine_tuned_model=ft_name,
                trained_tokens=int(result.trained_tokens),
                finished_at=finished,
                adapter_path=rel,
                progress=progress,
                estimated_finish=None,
                result_files=[results["id"]],
            )
        ).rowcount
        if changed != 1:
            log.warning("job %s changed under us (cancelled or taken over); not publishing", job.id)
            return False
        conn.execute(insert(File.__table__).values(**results))  # See Note: one results file
        exists = conn.execute(select(_models.c.id).where(_models.c.id == ft_name)).first()
        if exists is None:
            conn.execute(
                insert(_models).values(
                    id=ft_name,
                    tenant_id=job.tenant_id,
                    kind="fine_tuned",
                    base_model=job.model,
                    job_id=job.id,
                    artifact_path=rel,
                    owned_by=job.tenant_id,
                    created_at=finished,
                )
            )
        # In the same transaction: whoever sees `succeeded` also sees the closing events.
        conn.execute(
            insert(JobEvent.__table__),
            [
                event_values(job.id, f"New fine-tuned model created: {ft_name}"),
                event_values(job.id, "The job has successfully completed"),
            ],
        )
    return True


def _cuda_oom() -> type[BaseException]:
    import torch

    return getattr(torch.cuda, "OutOfMemoryError", MemoryError)
