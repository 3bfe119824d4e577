"""The GPU check: the engine's CUDA path on one GPU, offline, in one table (run by bench/gpu_check.sh).

1. The CUDA-marked tests (`pytest -m cuda tests/cuda`): the fused layers on bitsandbytes' CUDA kernels against
   PEFT's modules, a paged optimizer whose state is really in paged memory (also after a resume),
   exact resume with the CUDA RNG.
2. A QLoRA run of a Llama-7B-shaped model with random weights (qlora_core.testing, no download) at
   sequence length 2048, batch 1: our engine with its defaults (NF4 + DQ, compute_dtype auto, r=64
   on all linear layers, paged AdamW 32-bit), then the reference recipe (bench/reference_recipe.py,
   the QLoRA repository's bf16 run) on the same data; peak GPU memory and tokens/s of each.
   Anchors: the QLoRA paper's 7B figures (4-bit base 5,048 MB, LoRA weights 26 MB) and torchtune's
   QLoRA Llama-2-7B recipe (9.29 GB peak).

Prints the table (markdown) and, as its last line, `key=value` figures. `--device cpu --shape tiny`
runs the same pipeline at test size without a GPU (tests/bench/test_gpu_check.py does).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python bench/<this file>`

from bench.common import BENCH_DIR, REPO_ROOT, load_gsm8k_chats, run_child, tokenize_chat, write_jsonl  # noqa: E402
from service.lifetime import adopt_from_env  # noqa: E402

PAPER_7B_BASE_MB = 5048  # QLoRA paper, 7B: 4-bit base
PAPER_7B_LORA_MB = 26
TORCHTUNE_7B_QLORA_GB = 9.29  # torchtune's QLoRA Llama-2-7B single-device recipe, peak memory


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps of each 7B-shaped run (batch 1)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--shape", default="7b", help="a qlora_core.testing.LLAMA_SHAPES name")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a plumbing check at test size")
    p.add_argument("--skip-tests", action="store_true", help="leave out the CUDA-marked tests")
    p.add_argument("--skip-reference", action="store_true", help="leave out the reference recipe's run")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the model and runs here (default: a temp dir)")
    return p


def long_chats(n: int, tokenizer, seq_len: int) -> list[dict]:
    """`n` chats of at least `seq_len` tokens whose assistant turn survives truncation to `seq_len`.

    GSM8K problems (prompt, about a third) and their solutions (completion) are concatenated until
    the chat is long enough; truncation then cuts the end of the completion, so every example
    trains on about two thirds of `seq_len` supervised tokens on both sides.
    """
    pool, _ = load_gsm8k_chats(400, 0)
    out, k = [], 0
    for _ in range(n):
        questions, answers = [], []
        while True:
            q, a = pool[k % len(pool)]["messages"][0]["content"], pool[k % len(pool)]["messages"][1]["content"]
            k += 1
            questions.append(q)
            answers.append(a)
            chat = {"messages": [{"role": "user", "content": "\n\n".join(questions[: max(1, len(questions) // 3)])},
                                 {"role": "assistant", "content": "\n\n".join(answers)}]}  # fmt: skip
            ids, labels = tokenize_chat(tokenizer, chat["messages"], 1 << 30)
            if len(ids) >= seq_len:
                break
        out.append(chat)
    return out


def run_cuda_tests() -> dict[str, int | str]:
    """`pytest -m cuda tests/cuda` in a child; its pass/fail/skip counts.

    Only tests/cuda is collected: collecting every test would import the whole service (FastAPI,
    Celery, SQLAlchemy...), which a GPU machine set up for training alone may not have installed.
    tests/bench/test_gpu_check.py checks that every CUDA-marked test lives there.
    """
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/cuda"],
                          cwd=REPO_ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))  # fmt: skip
    counts: dict[str, int | str] = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    for part in last.strip("= ").split(","):
        words = part.split()
        if len(words) >= 2 and words[0].isdigit():
            key = words[1].rstrip("s") if words[1].startswith("error") else words[1]
            counts[key] = int(words[0])
    counts["summary"] = last.strip("= ")
    counts["output"] = proc.stdout[-4000:] + proc.stderr[-2000:]
    return counts


def side_argv(side: str, args: argparse.Namespace, model_dir: Path, train_file: Path, run_dir: Path) -> list[str]:
    shared = ["--model-dir", str(model_dir), "--train-file", str(train_file), "--output-dir", str(run_dir),
              "--result-json", str(run_dir / "result.json"), "--batch-size", "1", "--grad-accum", "1",
              "--max-len", str(args.seq_len), "--seed", "42"]  # fmt: skip
    if side == "reference":
        return [str(BENCH_DIR / "reference_recipe.py"), *shared, "--steps", str(args.steps), "--lora-r", str(args.lora_r)]
    return [str(BENCH_DIR / "engine_side.py"), *shared, "--set", f"lora_r={args.lora_r}"]


def format_table(rows: list[tuple[str, str]]) -> str:
    """A two-column markdown table."""
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'check'.ljust(width)} | result |", f"|{'-' * (width + 2)}|--------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    adopt_from_env()  # started by run_all or a harness: die with it (See Note: owned children)
    args = build_parser().parse_args(argv)
    import torch

    from qlora_core.testing import build_llama_shape_dir, build_tiny_tokenizer, count_parameters, llama_shape_config

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --device cpu --shape tiny for a plumbing check)", file=sys.stderr)
        return 2
    if args.device == "cpu":  # the children pick the GPU whenever one is visible: hide it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    t_start = time.perf_counter()
    rows: list[tuple[str, str]] = []
    figures: dict[str, str] = {}
    if args.device == "cuda":
        name = torch.cuda.get_device_name(0)
        cap = ".".join(map(str, torch.cuda.get_device_capability(0)))
        import bitsandbytes

        rows.append(("device", f"{name} (compute capability {cap}), torch {torch.__version__}, "
                               f"bitsandbytes {bitsandbytes.__version__}"))  # fmt: skip
    else:
        rows.append(("device", "cpu (plumbing check at test size)"))

    if not args.skip_tests:
        t = time.perf_counter()
        counts = run_cuda_tests()
        rows.append(("CUDA-marked tests (`pytest -m cuda tests/cuda`)", f"{counts['summary']} ({time.perf_counter() - t:.0f} s)"))
        figures["cuda_tests_failed"] = str(int(counts["failed"]) + int(counts["error"]))
        if counts["failed"] or counts["error"]:
            print(counts["output"])

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        config = llama_shape_config(args.shape)
        n_params = count_parameters(config)
        t = time.perf_counter()
        model_dir = build_llama_shape_dir(work / f"llama-{args.shape}", args.shape, device=args.device)
        rows.append((f"Llama-{args.shape}-shaped model, random weights", f"{n_params:,} parameters, written "
                     f"in {time.perf_counter() - t:.0f} s"))  # fmt: skip
        chats = long_chats(args.steps, build_tiny_tokenizer(), args.seq_len)
        train_file = write_jsonl(chats, work / "train.jsonl")
        sides = ["engine"] if args.skip_reference else ["engine", "reference"]
        results = {}
        for side in sides:
            run_dir = work / side
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir()
            child = run_child(side, side_argv(side, args, model_dir, train_file, run_dir), run_dir / "result.json",
                              run_dir / "log.txt")  # fmt: skip
            res = child.result
            results[side] = res
            label = "ours (defaults)" if side == "engine" else "reference recipe (qlora.py, bf16)"
            peak = res.get("cuda_peak_allocated_mb")
            mem = (f"peak GPU {peak / 1024:.2f} GB allocated, {res['cuda_peak_reserved_mb'] / 1024:.2f} GB reserved"
                   if peak is not None else f"peak RSS {child.peak_rss_mb / 1024:.2f} GB")  # fmt: skip
            # Every example is truncated to seq_len, so a step trains on seq_len tokens; a side that
            # dropped an example (nothing left to supervise) ran fewer steps and is counted by its own.
            res["tokens_per_s"] = res["steps"] * args.seq_len / res["train_s"]
            rows.append((f"{res['steps']} steps at {args.seq_len} tokens, r={args.lora_r}: {label}",
                         f"{mem}; {res['tokens_per_s']:.0f} tokens/s (train {res['train_s']:.1f} s, load "
                         f"{res['load_s']:.1f} s)"))  # fmt: skip
            figures[f"{side}_tokens_per_s"] = f"{res['tokens_per_s']:.0f}"
            if peak is not None:
                figures[f"{side}_peak_gpu_gb"] = f"{peak / 1024:.2f}"
        if "reference" in results:
            speedup = results["engine"]["tokens_per_s"] / results["reference"]["tokens_per_s"]
            figures["speedup"] = f"{speedup:.2f}"
            ratio = ""
            if "cuda_peak_allocated_mb" in results["engine"]:
                mem_ratio = results["engine"]["cuda_peak_allocated_mb"] / results["reference"]["cuda_peak_allocated_mb"]
                figures["gpu_mem_ratio"] = f"{mem_ratio:.2f}"
                ratio = f", {mem_ratio:.2f}x the reference's peak GPU memory"
            rows.append(("ours against the reference", f"{speedup:.2f}x the tokens/s{ratio}"))
        if args.shape == "7b":
            rows.append(("anchors", f"QLoRA paper 7B: 4-bit base {PAPER_7B_BASE_MB:,} MB + LoRA {PAPER_7B_LORA_MB} MB; "
                                    f"torchtune QLoRA Llama-2-7B: {TORCHTUNE_7B_QLORA_GB} GB peak"))  # fmt: skip
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    rows.append(("total time", f"{time.perf_counter() - t_start:.0f} s"))
    print(format_table(rows))
    print(" ".join(f"{k}={v}" for k, v in figures.items()) or "no_figures=1")
    return 1 if figures.get("cuda_tests_failed", "0") != "0" else 0


if __name__ == "__main__":
    raise SystemExit(main())
