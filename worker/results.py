"""A succeeded job's results file: OpenAI's `step_metrics.csv`, built from the job's metrics events.

OpenAI lists one file of purpose `fine-tune-results` in a succeeded job's `result_files`: a CSV
with one row per logged step and the header `step,train_loss,train_accuracy,valid_loss,
valid_mean_token_accuracy` (empty cells where a step did not evaluate). Ours is the same table,
served as plain CSV (OpenAI's own content is base64-encoded). The rows come from the metrics
events, which hold exactly one event per logged step (worker/events.py), so the file says what
`GET .../events` says. Torch-free.

Writing is split in two so that the row lands in the transaction that makes the job `succeeded`
(worker/training.py): `write_results_file` stores the bytes and returns the `files` row, the
caller inserts it beside the status; a caller that does not commit removes the bytes again.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Engine, select

from service.db import RESULTS_PURPOSE, JobEvent, new_id, now
from service.storage import write_file

log = logging.getLogger(__name__)

RESULTS_FILENAME = "step_metrics.csv"
RESULTS_HEADER = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
# CSV column -> key of a metrics event's `data`
_COLUMNS = {
    "step": "step",
    "train_loss": "train_loss",
    "train_accuracy": "train_mean_token_accuracy",
    "valid_loss": "valid_loss",
    "valid_mean_token_accuracy": "valid_mean_token_accuracy",
}

_events = JobEvent.__table__


def results_csv(metrics: Iterable[Mapping[str, Any]]) -> bytes:
    """The CSV of metrics events' `data`, one row per step in step order.

    Args:
        metrics: each a metrics event's `data` (`step`, `train_loss`, ...); a missing value is an empty cell.

    Returns:
        UTF-8 bytes, `\\n` line ends, the header first. Floats are written in full (`repr`), so a
        value read back equals the event's.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RESULTS_HEADER)
    for data in sorted(metrics, key=lambda d: int(d["step"])):
        writer.writerow([_cell(column, data.get(_COLUMNS[column])) for column in RESULTS_HEADER])
    return out.getvalue().encode()


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    return str(int(value)) if column == "step" else repr(float(value))


def job_metrics(engine: Engine, job_id: str) -> list[dict[str, Any]]:
    """The `data` of every metrics event of `job_id`, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(_events.c.data)
            .where(_events.c.job_id == job_id, _events.c.type == "metrics")
            .order_by(_events.c.seq)
        )
        return [dict(r.data) for r in rows if r.data and r.data.get("step") is not None]


def write_results_file(engine: Engine, storage: Any, job_id: str, tenant_id: str) -> dict[str, Any]:
    """Store the job's results CSV where uploads are stored; return the `files` row to insert.

    Nothing is recorded in the database here: the caller inserts the row in the transaction that
    publishes the job, and calls `storage.delete("files", storage_path)` if that transaction does
    not commit.

    Args:
        engine: the service database (the job's metrics events are read from it).
        storage: the service's store (service.objectstore.get_storage); the CSV is published to it.
        job_id: the job.
        tenant_id: the job's tenant, who owns the file.

    Returns:
        The values of the new `files` row (purpose `fine-tune-results`, a fresh `file-` id).
    """
    data = results_csv(job_metrics(engine, job_id))
    file_id = new_id("file")
    stored = write_file(storage.dirs["files"], tenant_id, file_id, data, suffix=".csv")
    storage.publish_file("files", stored.rel_path)
    log.info("job %s: results file %s (%d bytes)", job_id, file_id, stored.bytes)
    return {
        "id": file_id,
        "tenant_id": tenant_id,
        "filename": RESULTS_FILENAME,
        "purpose": RESULTS_PURPOSE,
        "bytes": stored.bytes,
        "sha256": stored.sha256,
        "storage_path": stored.rel_path,
        "status": "processed",
        "n_examples": 0,
        "data_format": None,
        "created_at": now(),
    }
