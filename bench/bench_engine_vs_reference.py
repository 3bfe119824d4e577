"""Our training engine against the QLoRA reference recipe (HF Trainer + PEFT + bitsandbytes).

Both sides fine-tune the bundled SmolLM2-135M-Instruct in NF4 on the same GSM8K examples with
the same effective batch, max length and seed; each run is a fresh process (its own peak RSS),
sides alternate (ref, ours, ref, ours, ...) so that a slow spell of a shared machine hits both,
and every adapter is then scored by one evaluation function (`common.evaluate_adapters`).

Prints per-run figures, per-side medians, and as the last line:
    speedup=X.XX rss_ratio=Y.YY eval_loss_delta=Z.Z% effect_ratio=E.EEE gates=pass
with speedup = ref_train_s / our_train_s, rss_ratio = our_rss / ref_rss,
eval_loss_delta = (ours - ref) / ref in percent and effect_ratio = our training effect over the
reference's, each the eval loss of the base without adapter minus the tuned one (all on medians).

Equal work is checked, not assumed: every run of both sides must take the same number of optimizer
steps on the same number of supervised tokens, and our training effect must be within 5 % of the
reference's (`EFFECT_TOLERANCE`): an eval-loss gate alone would pass an engine that trained far less,
since the whole effect is only a few percent of the loss. Each side's tokens/s is its own count over
its own time. A failed gate is printed as `gates=FAILED(...)` and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python bench/<this file>`

from bench.common import (  # noqa: E402
    BENCH_DIR,
    ChildResult,
    count_supervised_tokens,
    load_gsm8k_chats,
    median,
    resolve_model_dir,
    run_child,
    write_jsonl,
)
from service.lifetime import adopt_from_env  # noqa: E402

SIDES = ("reference", "engine")
EFFECT_TOLERANCE = 0.05  # |our base->tuned improvement - the reference's| / the reference's


def side_argv(side: str, args: argparse.Namespace, model_dir: Path, train_file: Path, run_dir: Path) -> list[str]:
    """The child command line for one run of one side."""
    shared = [
        "--model-dir", str(model_dir),
        "--train-file", str(train_file),
        "--output-dir", str(run_dir),
        "--result-json", str(run_dir / "result.json"),
        "--batch-size", str(args.batch_size),
        "--grad-accum", str(args.grad_accum),
        "--max-len", str(args.max_len),
        "--seed", str(args.seed),
    ]  # fmt: skip
    if side == "reference":
        steps = math.ceil(args.n_train / (args.batch_size * args.grad_accum))  # one pass, as ours
        dtype = ["--dtype", args.dtype] if args.dtype else []
        return [str(BENCH_DIR / "reference_recipe.py"), *shared, "--steps", str(steps), *dtype]
    extra = [a for item in args.ours_set for a in ("--set", item)]
    extra += ["--set", f"compute_dtype={args.dtype}"] if args.dtype else []
    mask = ["--attention-mask"] if args.ours_attention_mask else []
    return [str(BENCH_DIR / "engine_side.py"), *shared, *extra, *mask]


def equal_work_failures(runs: list[ChildResult], expected_tokens: int) -> list[str]:
    """What differs between the runs' work: optimizer steps, supervised tokens (empty: all equal)."""
    failures = []
    steps = sorted({int(c.result["steps"]) for c in runs})
    if len(steps) > 1:
        failures.append("steps " + ", ".join(f"{c.side}={c.result['steps']}" for c in runs))
    for c in runs:
        n = c.result.get("n_supervised_tokens")
        if n != expected_tokens:
            failures.append(f"{c.side} supervised_tokens={n} (the data has {expected_tokens})")
    return failures


def effect_ratio(base_loss: float, ref_loss: float, our_loss: float) -> float:
    """Our training effect over the reference's (1.0: the same improvement from the base)."""
    ref_effect = base_loss - ref_loss
    if ref_effect <= 0:
        raise ValueError(f"the reference did not improve on the base ({base_loss:.4f} -> {ref_loss:.4f})")
    return (base_loss - our_loss) / ref_effect


def main(argv: list[str] | None = None) -> int:
    adopt_from_env()  # started by run_all or a harness: die with it (See Note: owned children)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 train / 4 eval examples, batch 2x2, 1 repeat")
    parser.add_argument("--model-dir", default=None, help="base model dir (default: the store's bundled model)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep runs here (default: a temp dir, removed)")
    parser.add_argument("--ours-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="TrainConfig override on our side (experiments only; the headline uses defaults)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="both sides in this dtype (default: each its own, the reference bf16, ours auto)")
    parser.add_argument("--ours-attention-mask", action="store_true",
                        help="our side passes a padding attention_mask as the reference does (measures the mask's cost)")
    parser.add_argument("--sides", default="reference,engine", help="comma list, for debugging one side")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_eval, args.batch_size, args.grad_accum, args.repeats = 8, 4, 2, 2, 1
    sides = [s for s in args.sides.split(",") if s]
    if not set(sides) <= set(SIDES):
        parser.error(f"--sides must name {SIDES}, got {args.sides!r}")

    model_dir = resolve_model_dir(args.model_dir)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-engine-vs-ref-"))
    work.mkdir(parents=True, exist_ok=True)
    train_chats, eval_chats = load_gsm8k_chats(args.n_train, args.n_eval)
    train_file = write_jsonl(train_chats, work / "train.jsonl")
    eval_file = write_jsonl(eval_chats, work / "eval.jsonl")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n_sup = count_supervised_tokens(tokenizer, train_chats, args.max_len)
    print(
        f"model={model_dir} n_train={args.n_train} n_eval={args.n_eval} batch={args.batch_size}x{args.grad_accum} "
        f"max_len={args.max_len} seed={args.seed} repeats={args.repeats} supervised_tokens={n_sup} "
        f"dtype={args.dtype or 'own defaults'} ours_set={args.ours_set or 'defaults'} ours_attention_mask={args.ours_attention_mask}",
        flush=True,
    )

    runs: list[ChildResult] = []
    for rep in range(args.repeats):
        for side in sides:
            run_dir = work / f"{side}-{rep}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            child = run_child(side, side_argv(side, args, model_dir, train_file, run_dir), run_dir / "result.json", run_dir / "log.txt")
            runs.append(child)
            r = child.result
            print(
                f"run {rep} {side:9s}: load {r['load_s']:6.1f} s  train {r['train_s']:6.1f} s (cpu {r['train_cpu_s']:6.1f} s)  "
                f"steps {r['steps']}  "
                f"supervised tokens {r.get('n_supervised_tokens')}  "
                f"tok/s {(r.get('n_supervised_tokens') or 0) / r['train_s']:6.1f}  peak_rss {child.peak_rss_mb:7.0f} MB  "
                f"losses {[round(x, 3) for x in r['train_losses']]}",
                flush=True,
            )

    adapters = {f"{c.side}-{i}": c.result["adapter_dir"] for i, c in enumerate(runs)}
    eval_json = work / "eval.json"
    run_child(
        "eval",
        ["-m", "bench.common", "--model-dir", str(model_dir), "--eval-file", str(eval_file),
         "--adapters", json.dumps(adapters), "--max-len", str(args.max_len), "--result-json", str(eval_json)],
        eval_json,
        work / "eval-log.txt",
    )  # fmt: skip
    losses = json.loads(eval_json.read_text())
    print(f"eval loss of the 4-bit base without adapter: {losses['base']:.4f}")

    summary: dict[str, dict[str, float]] = {}
    for side in sides:
        mine = [(f"{c.side}-{i}", c) for i, c in enumerate(runs) if c.side == side]
        summary[side] = {
            "load_s": median([c.result["load_s"] for _, c in mine]),
            "train_s": median([c.result["train_s"] for _, c in mine]),
            "train_cpu_s": median([c.result["train_cpu_s"] for _, c in mine]),
            "tokens_per_s": median([(c.result.get("n_supervised_tokens") or 0) / c.result["train_s"] for _, c in mine]),
            "peak_rss_mb": median([c.peak_rss_mb for _, c in mine]),
            "eval_loss": median([losses[name] for name, _ in mine]),
            "steps": median([c.result["steps"] for _, c in mine]),
        }
        s = summary[side]
        print(
            f"median {side:9s}: load {s['load_s']:.1f} s  train {s['train_s']:.1f} s (cpu {s['train_cpu_s']:.1f} s)  "
            f"supervised tok/s {s['tokens_per_s']:.1f}  peak_rss {s['peak_rss_mb']:.0f} MB  "
            f"eval_loss {s['eval_loss']:.4f}  steps {s['steps']:g}  "
            f"(eval per run: {[round(losses[n], 4) for n, _ in mine]})"
        )
    (work / "summary.json").write_text(json.dumps({"args": vars(args) | {"work_dir": str(work)}, "summary": summary,
                                                   "eval_losses": losses}, indent=2, default=str))
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    if len(sides) < 2:
        print(f"only {sides[0]} was run; no comparison")
        return 0
    ref, ours = summary["reference"], summary["engine"]
    speedup = ref["train_s"] / ours["train_s"]
    rss_ratio = ours["peak_rss_mb"] / ref["peak_rss_mb"]
    delta = 100.0 * (ours["eval_loss"] - ref["eval_loss"]) / ref["eval_loss"]
    effect = effect_ratio(losses["base"], ref["eval_loss"], ours["eval_loss"])
    print(f"training effect (base - tuned eval loss): reference {losses['base'] - ref['eval_loss']:.4f}, "
          f"ours {losses['base'] - ours['eval_loss']:.4f}")
    failures = equal_work_failures(runs, n_sup)
    if abs(effect - 1.0) > EFFECT_TOLERANCE:
        failures.append(f"effect_ratio {effect:.3f} outside 1 +- {EFFECT_TOLERANCE}")
    gates = "pass" if not failures else "FAILED(" + "; ".join(failures) + ")"
    print(f"cpu-time speedup (less sensitive to other load): {ref['train_cpu_s'] / ours['train_cpu_s']:.2f}")
    print(f"speedup={speedup:.2f} rss_ratio={rss_ratio:.2f} eval_loss_delta={delta:.1f}% effect_ratio={effect:.3f} "
          f"gates={gates.replace(' ', '_')}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
