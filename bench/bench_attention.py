"""The attention backward on the CPU under bf16: torch's bf16 kernel against ours (fp32 kernel).

Two measurements, each alternating the two sides in one process and reporting medians:

1. The kernel alone, one SmolLM2-135M attention layer (9 query heads, 3 K/V heads, head dim 64),
   at the grid's three shapes (bench/bench_grid.py: `short` 8 rows of ~55 tokens, `gsm8k` 4 of
   ~200, `long` 2 of ~900): the backward of `_scaled_dot_product_flash_attention_for_cpu` in bf16
   (what `F.scaled_dot_product_attention` runs, the reference recipe's and transformers' sdpa),
   and in fp32 on upcast copies, as `qlora_core.attention.FlashAttentionCpu` runs it.
2. One training micro-batch (forward and backward, our engine: 4-bit SmolLM2, LoRA r=8 on every
   linear layer, fused layers, the default share of checkpointed blocks) at the same shapes, with
   the model's attention set to transformers' "sdpa" and to ours in turn. Ours takes the fp32
   backward only for rows the engine's rule covers on this CPU (`fp32_backward_max_len`: up to
   256 tokens, any length with AMX-BF16); past it both sides run sdpa's bf16 backward.

Prints the CPU, a table, and as the last line
`attention_bwd_speedup=<short>/<gsm8k>/<long> step_speedup=<short>/<gsm8k>/<long>` (sdpa's time
over ours: above 1 means ours is faster). On a CPU without native bf16 the engine computes in fp32
and never takes this path, so there it measures nothing (`n/a`) unless asked (`--emulated-bf16`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python bench/<this file>`

import torch  # noqa: E402

from bench.common import cpu_description, resolve_model_dir  # noqa: E402

SHAPES = {"short": (8, 55), "gsm8k": (4, 200), "long": (2, 900)}  # rows, tokens per row


def _alternate(sides: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each side, run in turn (the first two rounds are warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds + 2):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts[2:]) for name, ts in times.items()}


def kernel(rows: int, tokens: int, rounds: int) -> dict[str, float]:
    from qlora_core.attention import causal_backward_fp32

    g = torch.Generator().manual_seed(0)
    # (B, T, H, D) in memory, seen as (B, H, T, D): the layout a model's projections give
    q, k, v = (torch.randn(rows, tokens, heads, 64, generator=g).to(torch.bfloat16).transpose(1, 2) for heads in (9, 3, 3))
    grad = torch.randn(rows, tokens, 9, 64, generator=g).to(torch.bfloat16).transpose(1, 2)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    def bf16() -> None:
        backward(grad, q, k, v, out, lse, 0.0, True)

    def ours() -> None:
        causal_backward_fp32(grad, q, k, v, out, lse)

    return _alternate({"sdpa": bf16, "ours": ours}, rounds)


def step(model: torch.nn.Module, rows: int, tokens: int, rounds: int) -> dict[str, float]:
    from qlora_core.attention import ATTENTION
    from qlora_core.loss import causal_lm_loss

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40_000, (rows, tokens), generator=g)
    labels = ids.clone()
    labels[:, : tokens // 2] = -100  # the prompt half unsupervised, as in chat data
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(tokens).repeat(rows, 1)}
    base = model.get_base_model()

    def side(implementation: str) -> Callable[[], None]:
        def run() -> None:
            base.set_attn_implementation(implementation)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                parts = causal_lm_loss(model, batch)
            parts.loss_sum.backward()
            model.zero_grad(set_to_none=True)
        return run

    return _alternate({"sdpa": side("sdpa"), "ours": side(ATTENTION)}, rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed calls per side (after 2 warm-up calls)")
    parser.add_argument("--model-dir", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--emulated-bf16", action="store_true", help="measure even where bf16 is not native (slow)")
    args = parser.parse_args(argv)
    from qlora_core.device import native_dtype
    from qlora_core.models import add_lora, load_quantized_model
    from qlora_core.quant import auto_checkpoint_fraction  # the engine's default share of checkpointed blocks

    print(f"cpu: {cpu_description()}", flush=True)
    if native_dtype("cpu").dtype != "bfloat16" and not args.emulated_bf16:
        # Jobs here compute in fp32 and never take this path; bf16 would be emulated (~20x slower).
        print("this CPU has no native bf16: jobs compute in float32 and never take this path; "
              "--emulated-bf16 measures it anyway")
        print("attention_bwd_speedup=n/a step_speedup=n/a")
        return 0
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    model_dir = resolve_model_dir(args.model_dir)
    fraction = auto_checkpoint_fraction(json.loads((model_dir / "config.json").read_text()), 8, "bfloat16",
                                        "all-linear", True)
    torch.manual_seed(0)
    model = add_lora(load_quantized_model(model_dir, device="cpu", compute_dtype="bfloat16"), 8, 16, 0.0,
                     gradient_checkpointing=True, checkpoint_fraction=fraction)
    model.train()
    from qlora_core.attention import fp32_backward_max_len

    limit = fp32_backward_max_len()
    print(f"the engine's fp32 attention backward on this CPU: rows of {'any length' if limit is None else f'at most {limit} tokens'}")
    print(f"{'shape':6} {'rows x tokens':>13} | {'bwd sdpa ms':>11} {'bwd ours ms':>11} {'ratio':>6} | "
          f"{'step sdpa ms':>12} {'step ours ms':>12} {'ratio':>6}")
    kernel_ratios, step_ratios = [], []
    for name in shapes:
        rows, tokens = SHAPES[name]
        k = kernel(rows, tokens, args.rounds)
        s = step(model, rows, tokens, max(4, args.rounds // 2))
        kernel_ratios.append(k["sdpa"] / k["ours"])
        step_ratios.append(s["sdpa"] / s["ours"])
        print(f"{name:6} {f'{rows} x {tokens}':>13} | {k['sdpa'] * 1e3:11.2f} {k['ours'] * 1e3:11.2f} {kernel_ratios[-1]:6.2f} | "
              f"{s['sdpa'] * 1e3:12.0f} {s['ours'] * 1e3:12.0f} {step_ratios[-1]:6.2f}", flush=True)
    print(f"attention_bwd_speedup={'/'.join(f'{r:.2f}' for r in kernel_ratios)} "
          f"step_speedup={'/'.join(f'{r:.2f}' for r in step_ratios)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
