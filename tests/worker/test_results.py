"""The results CSV (worker/results.py) from metrics events on real SQLite and PostgreSQL: OpenAI's
header, one row per event in step order, values that read back exactly, nothing recorded before the
caller's transaction. A whole job writing it is in tests/worker/test_tasks.py."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

from sqlalchemy import Engine, func, select

from service.db import File, Job
from tests.worker.conftest import make_job
from worker.events import add_event
from service.objectstore import get_storage
from service.settings import Settings
from worker.results import RESULTS_HEADER, results_csv, write_results_file


def test_csv_has_openais_header_and_one_row_per_step_in_order() -> None:
    text = results_csv([
        {"step": 2, "train_loss": 1.25, "train_mean_token_accuracy": 0.5, "valid_loss": 0.1 + 0.2,
         "valid_mean_token_accuracy": 0.75, "total_steps": 2, "full_valid_loss": 9.0},
        {"step": 1, "train_loss": 2.5, "train_mean_token_accuracy": 0.25, "total_steps": 2},
    ]).decode()
    assert text.splitlines() == [
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy",
        "1,2.5,0.25,,",
        "2,1.25,0.5,0.30000000000000004,0.75",  # full precision: the event's float, not a rounding of it
    ]
    assert results_csv([]).decode() == ",".join(RESULTS_HEADER) + "\n"


def test_written_file_holds_the_jobs_metrics_events(engine: Engine, tmp_path: Path) -> None:
    job_id = make_job(engine, status="running")
    with engine.connect() as conn:
        tenant = conn.execute(select(Job.__table__.c.tenant_id).where(Job.__table__.c.id == job_id)).scalar_one()
    add_event(engine, job_id, "Fine-tuning job started")  # messages are not rows
    for step, loss in ((1, 3.0), (2, 2.0)):
        add_event(engine, job_id, f"Step {step}/2", type="metrics", dedup_key=f"metrics:{step}",
                  data={"step": step, "train_loss": loss, "train_mean_token_accuracy": 0.1 * step})
    row = write_results_file(engine, get_storage(Settings(data_dir=tmp_path)), job_id, tenant)

    path = tmp_path / "files" / row["storage_path"]
    assert row["storage_path"] == f"{tenant}/{row['id']}.csv" and row["id"].startswith("file-")
    assert (row["purpose"], row["filename"], row["tenant_id"]) == ("fine-tune-results", "step_metrics.csv", tenant)
    assert row["bytes"] == path.stat().st_size and row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert [(r["step"], float(r["train_loss"]), float(r["train_accuracy"])) for r in rows] == [("1", 3.0, 0.1),
                                                                                                ("2", 2.0, 0.2)]
    with engine.connect() as conn:  # the caller records it, in its own transaction
        assert conn.execute(select(func.count()).select_from(File.__table__)).scalar_one() == 0
