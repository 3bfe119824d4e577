"""Our side of the benchmark: `qlora_core.train.train` with the engine's own defaults.

Only what the two sides must share is set (batch size, gradient accumulation, max length, seed,
one pass over the same examples); everything else is the `TrainConfig` default a user gets.
`--set key=value` overrides a field for experiments (never used by `make bench`'s headline).

Run as a child of `bench_engine_vs_reference.py` (one fresh process per run, so that its peak RSS
is its own). Timing comes from the engine's callback: setup ends at `on_start` (tokenizer, model
load, LoRA, optimizer), training ends at the last step's `on_metrics`; saving the final checkpoint
and adapter is reported apart, as the reference does not save inside its timed region.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench.common import add_side_arguments, cuda_peak_memory  # noqa: E402
from qlora_core.config import TrainConfig  # noqa: E402
from qlora_core.train import TrainingCallback, train  # noqa: E402
from service.lifetime import adopt_from_env  # noqa: E402

logger = logging.getLogger("bench.engine")


class _Timer(TrainingCallback):
    """Records when setup ended and when each optimizer step was reported."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.last_metrics: float | None = None
        self.cpu_started = self.cpu_last = 0.0
        self.info: dict = {}
        self.losses: list[float] = []

    def on_start(self, info: dict) -> None:
        self.started, self.cpu_started = time.perf_counter(), time.process_time()
        self.info = info

    def on_metrics(self, step: int, metrics: dict) -> None:
        self.last_metrics, self.cpu_last = time.perf_counter(), time.process_time()
        self.losses.append(float(metrics["train_loss"]))

    def on_message(self, level: str, message: str) -> None:
        logger.info("[%s] %s", level, message)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn `key=value` strings into TrainConfig fields, with the field's own type.

    Raises:
        ValueError: for an unknown field or a value that does not parse.
    """
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in kinds:
            raise ValueError(f"--set expects FIELD=VALUE with a TrainConfig field, got {item!r}")
        # JSON covers ints, floats, true/false, null and lists; a bare word stays a string.
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _collate_with_attention_mask() -> None:
    """Make the engine's collator add the reference's padding `attention_mask` (an experiment).

    Our collator passes none (qlora_core.data, Note: packed attention), so CPU SDPA runs its plain
    causal kernel; the reference's collator passes one, which puts SDPA on its masked path. With
    this, both pay for the same attention and the difference is measured, not assumed. Rows hold
    one example each here (no packing), so ones up to the row's length are the whole mask.
    """
    from qlora_core import data

    plain = data.collate

    def collate(examples, rows, pad_token_id):  # noqa: ANN001, ANN202 (the wrapped signature)
        batch = plain(examples, rows, pad_token_id)
        if any(len(row) > 1 for row in rows):
            raise ValueError("--attention-mask is for unpacked rows (packing false)")
        mask = torch.zeros_like(batch["input_ids"])  # (B, T)
        for b, row in enumerate(rows):
            mask[b, : len(examples[row[0]].input_ids)] = 1
        return {**batch, "attention_mask": mask}

    data.collate = collate


def _replay_batch_order(path: Path, batch_size: int) -> None:
    """Make the engine train on the micro-batches the reference recorded.

    # Note: shared batch order. After a few steps on a small set, eval loss depends as much on
    # which examples made each step as on the engine: two correct samplers with different random
    # streams end several percent apart. Trained on the reference's own micro-batches, in its
    # order, the two sides differ only in their arithmetic, which is what the grid measures by
    # default (`--own-order` to let each side draw its own). Speed and memory are unaffected: our
    # planner groups by length as the reference's sampler does, so the padding is the same. The
    # recorded list spans every epoch; each epoch is ceil(n / batch_size) of it. Anything else
    # (another set, packing, the validation plan) keeps the engine's own planner.
    """
    from qlora_core import data

    recorded = json.loads(path.read_text())
    plain = data.plan_batches

    def plan_batches(lengths, batch_size_, max_seq_length, packing, seed, epoch, grad_accum=1):  # noqa: ANN001, ANN202
        per_epoch = -(-len(lengths) // batch_size)
        batches = recorded[epoch * per_epoch : (epoch + 1) * per_epoch]
        if packing or batch_size_ != batch_size or grad_accum == 1 or sorted(i for b in batches for i in b) != list(range(len(lengths))):
            return plain(lengths, batch_size_, max_seq_length, packing, seed, epoch, grad_accum)
        return [[[i] for i in batch] for batch in batches]

    data.plan_batches = plan_batches


def main(argv: list[str] | None = None) -> int:
    adopt_from_env()  # started by run_all or a harness: die with it (See Note: owned children)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_side_arguments(parser)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="TrainConfig override")
    parser.add_argument("--attention-mask", action="store_true",
                        help="pass a padding attention_mask as the reference's collator does (measures what not passing one buys)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.attention_mask:
        _collate_with_attention_mask()
    if args.batch_order is not None:
        _replay_batch_order(args.batch_order, args.batch_size)

    overrides = parse_overrides(args.set)
    config = TrainConfig(
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_seq_length=args.max_len,
        seed=args.seed,
        n_epochs=args.epochs,  # the same passes over the same examples as the reference
        **overrides,
    )
    timer = _Timer()
    t0 = time.perf_counter()
    result = train(args.model_dir, args.train_file, args.output_dir, config, callback=timer, resume=False)
    t_end = time.perf_counter()
    if timer.started is None or timer.last_metrics is None:
        raise RuntimeError(f"engine reported no start or no step (status {result.status})")

    out = {
        "side": "engine",
        "load_s": timer.started - t0,
        "train_s": timer.last_metrics - timer.started,
        "train_cpu_s": timer.cpu_last - timer.cpu_started,  # all threads; steadier on a shared machine
        "save_s": t_end - timer.last_metrics,
        "steps": result.steps,
        "n_examples": timer.info.get("n_examples"),
        "n_supervised_tokens": result.metrics.get("supervised_tokens"),
        "trained_tokens": result.trained_tokens,
        "train_losses": timer.losses,
        "adapter_dir": str(result.adapter_dir),
        "overrides": overrides,
        "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "compute_dtype": timer.info.get("compute_dtype"),
        "attention_mask": args.attention_mask,
        **cuda_peak_memory(),
    }
    args.result_json.write_text(json.dumps(out, indent=2))
    logger.info("engine: load %.1fs train %.1fs steps %d losses %s", out["load_s"], out["train_s"], result.steps, timer.losses)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
