"""Issue 14's loop with the official `openai` SDK against a live API and a real worker: a supervised job,
then a DPO job on its `fine_tuned_model` with `method=...`; both succeed, the DPO job's metrics show
rising `rewards/accuracies`, and its adapter downloads and loads like any other."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest

from qlora_cli.probe import wait_for_job_status
from service.db import FINISHED_STATUSES
from tests.e2e.conftest import TINY_MODEL_ID, LiveService
from tests.e2e.test_service_e2e import _training_file

pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 300
QLORA = {"lora_r": 4, "lora_alpha": 8, "max_seq_length": 64, "gradient_accumulation_steps": 1}


def _preference_file(n: int) -> bytes:
    """Preferred replies share a form ("Answer: N.") the others lack."""
    rows = [{"input": {"messages": [{"role": "user", "content": f"What is {i} plus {i + 1}?"}]},
             "preferred_output": [{"role": "assistant", "content": f"Answer: {2 * i + 1}."}],
             "non_preferred_output": [{"role": "assistant", "content": f"hmm, perhaps {2 * i + 2} or so"}]}
            for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_supervised_then_dpo_on_its_fine_tuned_model(live: LiveService, tmp_path: Path) -> None:
    client = live.client()
    sft_file = client.files.create(file=("sft.jsonl", io.BytesIO(_training_file(12))), purpose="fine-tune")
    sft = client.fine_tuning.jobs.create(
        model=TINY_MODEL_ID, training_file=sft_file.id, seed=3, suffix="sft",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
        extra_body={"qlora": {**QLORA, "learning_rate": 1e-3}})
    sft = wait_for_job_status(client, sft.id, FINISHED_STATUSES, JOB_TIMEOUT_S, log_tail=live.log_tail)
    assert sft.status == "succeeded", f"{sft.error}\n{live.log_tail()}"

    pref_file = client.files.create(file=("prefs.jsonl", io.BytesIO(_preference_file(16))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=sft.fine_tuned_model, training_file=pref_file.id, seed=3, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 2, "batch_size": 2,
                                                              "learning_rate_multiplier": 50}}},
        extra_body={"qlora": {"max_seq_length": 64, "gradient_accumulation_steps": 1}})
    assert job.model == sft.fine_tuned_model and job.method.type == "dpo"
    assert job.method.dpo.hyperparameters.beta == 0.1
    job = wait_for_job_status(client, job.id, FINISHED_STATUSES, JOB_TIMEOUT_S, log_tail=live.log_tail)
    assert job.status == "succeeded", f"{job.error}\n{live.log_tail()}"
    assert job.fine_tuned_model.startswith(f"ft:{TINY_MODEL_ID}:e2e:dpo:")

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))[::-1]
    messages = [e.message for e in events if e.type == "message"]
    assert any("fine-tuned model" in m for m in messages) and any("reference log-probs" in m for m in messages)
    metrics = [e.data for e in events if e.type == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 17))
    assert all({"train_loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
               <= set(m) for m in metrics)
    acc = [m["rewards/accuracies"] for m in metrics]
    # Step 1 is measured before any update: the policy is its reference, so the margins are 0 up to
    # rounding (in bf16 the reference pass's other batch shapes round differently, and a margin of
    # 1e-4 counts as right or wrong by chance).
    assert abs(metrics[0]["rewards/margins"]) < 0.02
    assert sum(acc[-4:]) / 4 > 0.5 and sum(acc[-4:]) > sum(acc[:4]), acc  # rising
    assert metrics[-1]["rewards/margins"] > 0

    resp = httpx.get(f"{live.base_url}/v1/fine_tuning/jobs/{job.id}/adapter", headers=live.headers, timeout=60)
    assert resp.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:gz") as tar:
        tar.extractall(tmp_path / "adapter", filter="data")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_core.store import ModelStore

    base = AutoModelForCausalLM.from_pretrained(ModelStore(live.data_dir / "models").model_path(TINY_MODEL_ID))
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert any(float(p.abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
