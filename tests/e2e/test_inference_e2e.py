"""Chat with what you trained, end to end: a job trained through the live service (both modes) is
then asked through the same `openai` SDK, streamed and not, and answers token for token what its
downloaded adapter gives under `PeftModel.from_pretrained`; its merged 16-bit model, built by the
worker on request, loads in transformers and answers as that adapter on the 16-bit base; tenancy
holds; a killed inference server is restarted by `qlora serve`, and the API answers 503
meanwhile, never hangs.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.e2e.conftest import TINY_MODEL_ID, LiveService, _run, qlora_cmd
from tests.e2e.test_service_e2e import _create_job, _wait_finished

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 3 plus 4?"}]


def _peft_answer(live: LiveService, adapter_dir: Path, max_new: int) -> str:
    """What a user writes by hand: the same 4-bit base, the downloaded adapter, greedy `generate`."""
    import torch
    from peft import PeftModel

    from qlora_core.device import native_dtype
    from qlora_core.models import load_quantized_model, load_tokenizer
    from qlora_core.store import ModelStore

    base_dir = ModelStore(live.data_dir / "models").model_path(TINY_MODEL_ID)
    model = PeftModel.from_pretrained(load_quantized_model(base_dir, compute_dtype=native_dtype("cpu").dtype,
                                                           device="cpu"), str(adapter_dir))  # fmt: skip
    model.eval()
    tok = load_tokenizer(base_dir)
    ids = torch.tensor([tok(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]])  # fmt: skip
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_chat_with_the_fine_tuned_model(live: LiveService, tmp_path: Path) -> None:
    job, _ = _create_job(live, n_examples=12, max_steps=2, n_checkpoints=2)
    job = _wait_finished(live, job.id)
    assert job.status == "succeeded", f"{job.error}\n{live.log_tail()}"
    client = live.client()
    ask = dict(model=job.fine_tuned_model, messages=MESSAGES, temperature=0, max_tokens=12)

    whole = client.chat.completions.create(**ask)
    assert whole.object == "chat.completion" and whole.model == job.fine_tuned_model
    assert whole.usage.prompt_tokens > 0 and 0 < whole.usage.completion_tokens <= 12
    assert whole.choices[0].finish_reason in ("stop", "length")

    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content

    resp = httpx.get(f"{live.base_url}/v1/fine_tuning/jobs/{job.id}/adapter", headers=live.headers, timeout=60)
    with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:gz") as tar:
        tar.extractall(tmp_path / "adapter", filter="data")
    assert whole.choices[0].message.content == _peft_answer(live, tmp_path / "adapter", 12)
    # vLLM's LoRA loader (`--enable-lora`) takes it as it is (README: serving with vLLM)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == TINY_MODEL_ID  # the served id, not a server path
    assert not config.get("modules_to_save") and not config.get("use_dora") and config["bias"] == "none"
    assert config["peft_type"] == "LORA" and 1 <= config["r"] <= 512

    # a checkpoint is a model too; the base answers differently from the trained adapter's model
    ckpt = client.fine_tuning.jobs.checkpoints.list(job.id).data[-1].fine_tuned_model_checkpoint
    assert client.chat.completions.create(**{**ask, "model": ckpt}).choices[0].message.content
    assert client.completions.create(model=TINY_MODEL_ID, prompt="3 plus 4 is", max_tokens=4, temperature=0).usage

    other_key = _run(qlora_cmd("keys", "create", "--tenant", "someone-else"), live.env).strip().splitlines()[-1]
    other = openai.OpenAI(base_url=live.base_url + "/v1", api_key=other_key, max_retries=0, timeout=60)
    for name in (job.fine_tuned_model, ckpt):
        with pytest.raises(openai.NotFoundError) as e:
            other.chat.completions.create(**{**ask, "model": name})
        assert e.value.body["code"] == "model_not_found"

    _check_merged_export(live, job.id, tmp_path)
    client.models.delete(job.fine_tuned_model)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**ask)
    gone = httpx.get(f"{live.base_url}/v1/fine_tuning/jobs/{job.id}/merged", headers=live.headers, timeout=60)
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "model_deleted"


MERGE_TIMEOUT_S = 120
# See BF16_LOGITS_ATOL in tests/worker/test_export.py: merged bf16 weights against the adapter applied
# beside the bf16 base differ by bf16 rounding only.
BF16_LOGITS_ATOL = 0.03


def _check_merged_export(live: LiveService, job_id: str, tmp_path: Path) -> None:
    """GET .../merged: 202 while the worker builds it, then a model directory that transformers loads
    and that answers as the downloaded adapter does on the 16-bit base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_core.store import ModelStore

    url = f"{live.base_url}/v1/fine_tuning/jobs/{job_id}/merged"
    resp = httpx.get(url, headers=live.headers, timeout=60)
    assert resp.status_code == 202 and int(resp.headers["retry-after"]) > 0, resp.text
    assert resp.json()["status"] == "building"
    deadline = time.monotonic() + MERGE_TIMEOUT_S
    while resp.status_code == 202:
        assert time.monotonic() < deadline, f"no merged model after {MERGE_TIMEOUT_S} s\n{live.log_tail()}"
        time.sleep(1)
        resp = httpx.get(url, headers=live.headers, timeout=60)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/gzip", resp.text
    with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:gz") as tar:
        tar.extractall(tmp_path / "merged", filter="data")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.dtype == torch.bfloat16  # the tiny base's config says bfloat16 (worker/export.py)
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([tok(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]])  # fmt: skip
    with torch.no_grad():
        out = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                              do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
        assert out.shape[1] > ids.shape[1]
        base = AutoModelForCausalLM.from_pretrained(ModelStore(live.data_dir / "models").model_path(TINY_MODEL_ID),
                                                    dtype=torch.bfloat16)  # fmt: skip
        reference = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(merged(ids).logits.float(), reference(ids).logits.float(),
                                   atol=BF16_LOGITS_ATOL, rtol=0)  # fmt: skip
    assert httpx.get(url, headers=live.headers, timeout=60).content == resp.content  # built once, then cached


def test_a_killed_inference_server_comes_back(live: LiveService) -> None:
    children = subprocess.run(["pgrep", "-P", str(live.procs["api"].pid), "-f", "qlora_cli.main infer"],
                              capture_output=True, text=True).stdout.split()  # fmt: skip
    assert len(children) == 1, children
    infer = psutil.Process(int(children[0]))
    t_kill = time.monotonic()
    subprocess.run(["kill", f"-{signal.SIGKILL.value}", children[0]], check=True)
    # `kill` returns when the signal is sent, not when the process is gone: until it has exited,
    # its socket still accepts a connection and then resets it (502, the answer for a server that
    # dies mid-request). Asked once it is dead, nothing listens: 503.
    with contextlib.suppress(psutil.NoSuchProcess):
        while infer.status() != psutil.STATUS_ZOMBIE and time.monotonic() - t_kill < 10:
            time.sleep(0.05)
    ask = dict(model=TINY_MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=4)
    client = live.client()
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**ask)
    assert e.value.status_code == 503 and e.value.body["code"] == "inference_unavailable"
    assert time.monotonic() - t0 < 10  # an answer, not a hang
    deadline = time.monotonic() + 120
    while True:  # `qlora serve` restarts it within seconds; the first answer also loads the base
        try:
            assert client.chat.completions.create(**ask).choices[0].message.content is not None
            break
        except openai.APIStatusError as err:
            assert err.status_code == 503 and time.monotonic() < deadline, live.log_tail()
            time.sleep(1)
