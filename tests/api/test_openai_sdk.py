"""The official `openai` SDK against a live uvicorn: files and fine-tuning jobs, unchanged client code.

No worker runs here (jobs stay `validating_files` until cancelled); the worker tests train
end to end. Jobs go to the real embedded broker. The live server is conftest.py's `server`.
"""

from __future__ import annotations

import openai
import pytest

from qlora_core.store import BUNDLED_MODEL_ID
from tests.api.conftest import jsonl


def test_sdk_files_and_jobs_round_trip(server, alice, bob, tmp_path):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=alice.key, max_retries=0)
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(12))
    f = client.files.create(file=data.open("rb"), purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == data.stat().st_size and f.purpose == "fine-tune"
    assert [x.id for x in client.files.list()] == [f.id]
    assert client.files.retrieve(f.id).filename == "train.jsonl"
    assert client.files.content(f.id).read() == data.read_bytes()

    job = client.fine_tuning.jobs.create(model=BUNDLED_MODEL_ID, training_file=f.id, suffix="sdk",
                                         hyperparameters={"n_epochs": 2}, seed=7,
                                         extra_body={"qlora": {"lora_r": 8, "max_steps": 2}})
    assert job.status == "validating_files" and job.seed == 7 and job.hyperparameters.n_epochs == 2
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
    assert client.fine_tuning.jobs.retrieve(job.id).model == BUNDLED_MODEL_ID
    events = client.fine_tuning.jobs.list_events(job.id)
    assert events.data[0].message.startswith("Created fine-tuning job")
    assert list(client.fine_tuning.jobs.checkpoints.list(job.id)) == []
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert BUNDLED_MODEL_ID in [m.id for m in client.models.list()]

    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="no/such", training_file=f.id)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    other = openai.OpenAI(base_url=f"{server}/v1", api_key=bob.key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="sk-qlora-wrongwrongwrong", max_retries=0).files.list()

    assert client.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_sdk_reads_a_jobs_results_file(server, alice, bob, settings, tmp_path):
    """`job.result_files` -> `client.files.content(id).text` is the CSV, as with OpenAI (whose is base64)."""
    import csv
    import io

    from tests.api.test_job_outputs import _finish

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=alice.key, max_retries=0)
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(12))
    f = client.files.create(file=data.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=BUNDLED_MODEL_ID, training_file=f.id)
    # A synthetic succeeded job: _finish writes the worker's rows and its results CSV (made by
    # worker.results from three metrics events); the worker itself is tested in tests/worker.
    _finish(settings, job.id)
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded" and len(job.result_files) == 1
    rid = job.result_files[0]
    meta = client.files.retrieve(rid)
    assert meta.purpose == "fine-tune-results" and meta.filename == "step_metrics.csv"
    assert rid in [x.id for x in client.files.list()]
    text = client.files.content(rid).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert [float(r["train_loss"]) for r in rows] == [2.0, 1.0, 2.0 / 3]
    assert meta.bytes == len(text.encode())

    other = openai.OpenAI(base_url=f"{server}/v1", api_key=bob.key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.files.content(rid)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(rid)
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=BUNDLED_MODEL_ID, training_file=rid)
    assert e.value.code == "invalid_file_purpose" and "fine-tune-results" in str(e.value)
    assert client.files.delete(rid).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.content(rid)
