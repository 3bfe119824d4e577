"""The QLoRA fine-tuning recipe: setup, train, checkpoint, cleanup, in one readable function.

Modelled on torchtune's single-device LoRA recipe: a flat `TrainConfig` drives it, helpers take flat
arguments, and progress leaves through a small callback object (the worker turns it into job
events). The method is the QLoRA paper's (Dettmers et al. 2023): a frozen NF4 base with double
quantization, bf16 compute (where the device has it natively), LoRA on every linear layer, a paged
AdamW, loss on the completion only.

What makes it an engine rather than a script:
  * the loss and the vocabulary projection run only at supervised positions (`qlora_core.loss`);
  * gradient accumulation is normalised by the supervised tokens of the whole optimizer step, so
    `batch_size=b, gradient_accumulation_steps=k` gives the gradient of one batch of `b*k`;
  * checkpoints are atomic and hold everything a bitwise-exact resume needs (See Note: exact resume);
  * cancellation is cooperative (`should_stop`), and running out of memory says what to lower.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import random
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_core import checkpoint as ckpt
from qlora_core.config import TrainConfig
from qlora_core.device import default_device, resolve_compute_dtype
from qlora_core.evaluate import evaluate, full_evaluation
from qlora_core.loss import causal_lm_loss, count_supervised, supports_supervised_logits
from qlora_core.optim import build_optimizer, build_scheduler, load_optimizer_state
from qlora_core.plan import RunPlan, make_plan, valid_plan
from qlora_core.quant import auto_checkpoint_fraction

logger = logging.getLogger(__name__)

# Changing these between a checkpoint and its resume changes only what is reported, or memory and
# time (the gradients agree to bf16 rounding), not the math. The memory ones let a run that hit
# out_of_memory resume with more checkpointing, and a checkpoint written before an option existed
# resume under its default.
_RESUME_SAFE_FIELDS = {
    "logging_steps", "eval_steps", "n_checkpoints", "checkpoint_steps", "max_eval_examples",
    "gradient_checkpointing", "checkpoint_fraction", "fused_layers",
}  # fmt: skip


def _load_malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


_MALLOC_TRIM = _load_malloc_trim() if sys.platform.startswith("linux") else None


class _HeapTrimmer:
    """While training on a CPU with glibc, hand freed heap pages back to the OS every `interval_s`.

    # Note: CPU heap trimming. On a CPU the activations of a micro-batch are hundreds of MB of
    # short-lived malloc'd blocks; glibc keeps freed blocks in its heap and reuses them unevenly,
    # so resident memory ratchets up within and across steps (SmolLM2, batch 4 x 512: 770 MB after
    # setup, 2.1-2.2 GB peak by step 2). A daemon thread calling `malloc_trim(0)` every second
    # (ctypes releases the GIL; glibc locks its arenas) returns the free pages while backward is
    # still running: 150-250 MB less peak for ~1.3 s more system time per two steps (page faults,
    # 1.8 M against 0.95 M untrimmed). Every 0.2 s costs ~20% in time; every 2 s was no faster;
    # once per micro-batch, after forward, saves less (the peak is reached inside backward).
    """

    def __init__(self, on_cpu: bool, interval_s: float = 1.0) -> None:
        self.active = on_cpu and _MALLOC_TRIM is not None
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heap-trimmer", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            _MALLOC_TRIM(0)

    def __enter__(self) -> "_HeapTrimmer":
        if self.active:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self._stop.set()
            self._thread.join()


class OutOfMemory(RuntimeError):
    """The run did not fit in memory; the message says which settings to lower."""


class TrainingError(RuntimeError):
    """The run cannot proceed for a reason the user can fix (bad data, incompatible checkpoint)."""


class TrainingCallback:
    """Receives a run's progress. A plain base class with no-op methods: override what you need."""

    def on_message(self, level: str, message: str) -> None:
        """A human-readable note; `level` is "info", "warn" or "error" (OpenAI event levels)."""

    def on_start(self, info: dict) -> None:
        """Once, after setup: total_steps, n_examples, stats, device, resumed_from_step, ..."""

    def on_metrics(self, step: int, metrics: dict) -> None:
        """Exactly once per logged step (See Note: logged steps)."""

    def on_checkpoint(self, step: int, path: Path, metrics: dict) -> None:
        """After `path` is complete on disk (atomic), with the metrics of that step."""

    def on_resumed(self, step: int, path: Path, metrics: dict) -> None:
        """A resumed run starts from the complete checkpoint `path` of `step` (metrics of that step).

        A holder can stop between making a checkpoint complete and reporting it (its lease lost
        in that window): the next run resumes from it, and this is where it can be recorded.
        """

    def should_stop(self, step: int) -> bool:
        """Asked before every optimizer step with the number of steps done; True stops the run."""
        return False

    def may_write(self, step: int) -> bool:
        """Asked right before a checkpoint or the final adapter is written, and again once its files
        are on disk, right before they are renamed into place; False stops the run without
        publishing it (a worker answers whether it still holds the job's lease)."""
        return True


@dataclass
class TrainResult:
    """How a run ended.

    `trained_tokens` counts every non-padding token fed through the model in training, epochs
    included: for a full run that is OpenAI's "tokens in the training file x epochs".
    `metrics` is the last metrics event plus `supervised_tokens` (tokens the loss was taken on);
    with a validation file it holds `full_valid_loss` and `base_full_valid_loss` (See Note: full
    validation).
    """

    status: str  # "completed" | "stopped"
    steps: int
    total_steps: int
    trained_tokens: int
    adapter_dir: Path | None
    checkpoints: list[tuple[int, Path]]
    metrics: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    model_dir: str | Path,
    train_file: str | Path,
    output_dir: str | Path,
    config: TrainConfig,
    valid_file: str | Path | None = None,
    callback: TrainingCallback | None = None,
    resume: bool = True,
    init_adapter: str | Path | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter on a 4-bit base model (supervised, or DPO with `config.method`).

    Args:
        model_dir: a base-model dir (`qlora_core.store`): config, safetensors weights, tokenizer.
        train_file: JSONL training data in any format `qlora_core.validate` accepts.
        output_dir: where `checkpoints/` and, on completion, `adapter/` go.
        config: the run's hyperparameters; checked first.
        valid_file: optional JSONL validation data, evaluated every `eval_steps` (at most
            `max_eval_examples` of it) and, whole, at the last step (See Note: full validation).
        callback: progress sink; `TrainingCallback()` when None.
        resume: continue from the latest complete checkpoint in `output_dir`, if any.
        init_adapter: a saved adapter (PEFT layout, same rank) to start from instead of a fresh one:
            training continues a fine-tuned model; for DPO that model is also the reference.

    Returns:
        A `TrainResult`; `status="stopped"` (and no final adapter) if `should_stop` said so.

    Raises:
        ValueError: if `config` is invalid.
        OutOfMemory: if a step, the model or the optimizer does not fit; says what to lower.
        TrainingError: on unusable data or a checkpoint made with an incompatible config.
    """
    config.check()
    cb = callback or TrainingCallback()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _HeapTrimmer(on_cpu=not torch.cuda.is_available()):
            return _run(Path(model_dir), Path(train_file), output_dir, config, valid_file, cb, resume,
                        Path(init_adapter) if init_adapter is not None else None)
    except torch.OutOfMemoryError as exc:
        raise OutOfMemory(_oom_advice(config, exc)) from exc
    except RuntimeError as exc:
        if _is_cpu_oom(exc):
            raise OutOfMemory(_oom_advice(config, exc)) from exc
        raise
    finally:
        # Cleanup: the worker process trains job after job; hand memory back now.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _run(
    model_dir: Path,
    train_file: Path,
    output_dir: Path,
    config: TrainConfig,
    valid_file: str | Path | None,
    cb: TrainingCallback,
    resume: bool,
    init_adapter: Path | None = None,
) -> TrainResult:
    from qlora_core import data, dpo, fused, models

    # ---- setup --------------------------------------------------------------------------------
    seed_everything(config.seed)
    ckpt.remove_stale_temp_dirs(output_dir)
    choice = resolve_compute_dtype(config.compute_dtype, default_device())
    cb.on_message("warn" if choice.emulated else "info", choice.reason)
    compute_dtype = choice.dtype
    tokenizer = models.load_tokenizer(model_dir)
    is_dpo = config.method == "dpo"

    def tokenize(path: str | Path) -> tuple[list, Any]:
        try:
            return dpo.tokenize_for(tokenizer, path, config)
        except dpo.WrongMethod as exc:
            raise TrainingError(str(exc)) from exc

    train_examples, stats = tokenize(train_file)
    _report_stats(cb, "training", stats, config.max_seq_length)
    if not train_examples:
        raise TrainingError(f"no usable training examples in {train_file} (all dropped or empty)")
    valid_examples: list = []
    all_valid_examples: list = []  # the whole file, for the final evaluation (See Note: full validation)
    if valid_file is not None:
        all_valid_examples, valid_stats = tokenize(valid_file)
        _report_stats(cb, "validation", valid_stats, config.max_seq_length)
        valid_examples = all_valid_examples
        if config.max_eval_examples is not None:  # for DPO a count of pairs, each two rows
            valid_examples = all_valid_examples[: config.max_eval_examples * (2 if is_dpo else 1)]

    # For DPO the plan's "examples" are pairs, each as long as its longer row.
    lengths = dpo.pair_lengths(train_examples) if is_dpo else [len(ex.input_ids) for ex in train_examples]
    try:
        plan = make_plan(lengths, config, bool(valid_examples))
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    latest = ckpt.latest_checkpoint(output_dir) if resume else None
    saved = ckpt.read_state(latest) if latest is not None else None
    if saved is not None:
        _check_resumable(saved["config"], config, latest)  # before the slow model load
        if saved.get("compute_dtype", compute_dtype) != compute_dtype:  # resumed on another kind of device
            cb.on_message("warn", f"the checkpoint was trained with compute_dtype {saved['compute_dtype']}; this "
                                  f"device continues in {compute_dtype}, so the result is not bitwise what an "
                                  "uninterrupted run would give")  # fmt: skip
    elif not resume and ckpt.list_checkpoints(output_dir):
        # Starting over: a previous run's checkpoints would otherwise mix with this run's.
        cb.on_message("info", f"resume=False: removing the previous run's checkpoints in {output_dir}")
        shutil.rmtree(output_dir / ckpt.CHECKPOINTS)
        shutil.rmtree(output_dir / ckpt.ADAPTER, ignore_errors=True)
    fraction = config.checkpoint_fraction
    if fraction is None and config.gradient_checkpointing:  # See Note: memory-neutral checkpointing
        model_config = json.loads((Path(model_dir) / "config.json").read_text())
        fraction = auto_checkpoint_fraction(
            model_config, config.lora_r, compute_dtype, config.target_modules, config.fused_layers, default_device()
        )
        why = ("every decoder layer" if fraction == 1.0 else
               f"{fraction:.0%} of the decoder layers, spending on the rest memory the chunked loss saves")  # fmt: skip
        cb.on_message("info", f"checkpoint_fraction not set: checkpointing {why} "
                              "(qlora_core.quant.auto_checkpoint_fraction)")  # fmt: skip
    model = models.load_quantized_model(
        model_dir, quant_type=config.quant_type, double_quant=config.double_quant, compute_dtype=compute_dtype
    )
    model = models.add_lora(
        model,
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=config.target_modules,
        gradient_checkpointing=config.gradient_checkpointing,
        checkpoint_fraction=1.0 if fraction is None else fraction,
        fused_layers=config.fused_layers,
    )
    _keep_4bit_layout(model)
    if init_adapter is not None and saved is None:  # a checkpoint, when there is one, holds newer weights
        ckpt.load_adapter_weights(model, init_adapter)
        cb.on_message("info", f"starting from the adapter of the fine-tuned model ({init_adapter.name})")
    device = next(p for p in model.parameters() if p.requires_grad).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.optimizer, config.learning_rate, config.weight_decay, device, cb.on_message)
    scheduler, warmup_steps = build_scheduler(optimizer, config.lr_scheduler, plan.total_steps, config.warmup_ratio)
    autocast = _autocast(device, models.resolve_dtype(compute_dtype))
    # Note: fp16 loss scaling. fp16 (the choice on T4/V100-class GPUs) has 5 exponent bits, so small
    # activation gradients underflow to zero; as in transformers' fp16 runs, the loss is scaled up
    # before backward and the gradients (of the fp32 LoRA weights) unscaled before clipping, and a
    # step whose gradients overflowed is skipped while the scale adapts. bf16 and fp32 need none.
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == "float16")
    if not supports_supervised_logits(model):
        cb.on_message("info", "model has no separable output head; computing full logits (slower)")
    pad_id = tokenizer.pad_token_id
    valid_batches = (
        [data.collate(valid_examples, rows, pad_id) for rows in valid_plan(valid_examples, config)]
        if valid_examples and not is_dpo
        else []
    )

    # See Note: exact resume
    state = {"step": 0, "epoch": 0, "group": 0, "trained_tokens": 0, "supervised_tokens": 0, "history": []}
    if is_dpo:
        state["reference"] = None  # See Note: reference log-probs in qlora_core/dpo.py
    if saved is not None:
        ckpt.load_adapter_weights(model, latest)
        load_optimizer_state(optimizer, saved["optimizer"])  # See Note: paged state after a resume
        if scaler.is_enabled() and saved.get("grad_scaler"):
            scaler.load_state_dict(saved["grad_scaler"])
        scheduler.load_state_dict(saved["scheduler"])
        ckpt.restore_rng_state(saved["rng"])
        state = {k: saved[k] for k in state}
        cb.on_message("info", f"resumed from checkpoint at step {state['step']} ({latest.name})")
        cb.on_resumed(state["step"], latest, dict(state["history"][-1]) if state["history"] else {})
    if is_dpo and state["reference"] is None:
        t0 = time.perf_counter()
        state["reference"] = {
            split: dpo.reference_logps(model, rows, _pair_batches(rows, config), pad_id, device, autocast,
                                       adapter_off=init_adapter is None) if rows else None
            for split, rows in (("train", train_examples), ("valid", all_valid_examples))
        }
        cb.on_message("info", f"reference log-probs of {len(train_examples) // 2 + len(all_valid_examples) // 2} "
                              f"pairs taken once ({'the base model, adapter off' if init_adapter is None else 'the fine-tuned model'}"
                              f"), in {time.perf_counter() - t0:.1f} s")  # fmt: skip

    cb.on_start(
        {
            "total_steps": plan.total_steps,
            "n_epochs": plan.n_epochs,
            "steps_per_epoch": plan.steps_per_epoch,
            "n_examples": len(train_examples),
            "n_valid_examples": len(valid_examples),
            "stats": asdict(stats),
            "device": str(device),
            "compute_dtype": compute_dtype,
            "resumed_from_step": state["step"] if latest is not None else None,
            "trainable_parameters": sum(p.numel() for p in params),
            "warmup_steps": warmup_steps,
            "checkpoint_steps": sorted(plan.checkpoint_steps),
            "checkpoint_fraction": fraction if config.gradient_checkpointing else 0.0,
        }
    )

    # ---- train --------------------------------------------------------------------------------
    model.train()
    window = {"loss": 0.0, "correct": 0, "tokens": 0}  # since the last logged step
    pair_window = dpo.new_window()
    started = time.perf_counter()
    step = state["step"]
    for epoch in range(state["epoch"], plan.n_epochs):
        groups = plan.step_groups(epoch)
        first = state["group"] if epoch == state["epoch"] else 0
        for g in range(first, len(groups)):
            if step >= plan.total_steps:
                break
            if cb.should_stop(step):
                cb.on_message("info", f"stopped at step {step} of {plan.total_steps}")
                return _result("stopped", step, plan, state, output_dir, None)
            lr = scheduler.get_last_lr()[0]
            if is_dpo:
                n_sup = _dpo_micro_batches(model, groups[g], train_examples, state["reference"]["train"], config,
                                           pad_id, device, autocast, scaler, pair_window)
            else:
                batches = [data.collate(train_examples, rows, pad_id) for rows in groups[g]]
                # Note: accumulation normalisation. Each micro-batch's summed loss is divided by the
                # supervised tokens of the *whole* step, so the accumulated gradient equals that of
                # one big batch (not a mean of per-batch means, which over-weights short batches).
                n_sup = sum(count_supervised(b["labels"]) for b in batches)
                for b, rows in zip(batches, groups[g]):
                    b = {k: v.to(device) for k, v in b.items()}
                    index, n_slots = data.real_token_index(train_examples, rows)
                    with fused.real_tokens(index.to(device), n_slots):  # See Note: padding-free MLP
                        with autocast:
                            parts = causal_lm_loss(model, b)
                        scaler.scale(parts.loss_sum / max(n_sup, 1)).backward()  # See Note: fp16 loss scaling
                    window["loss"] += float(parts.loss_sum.detach())
                    window["correct"] += parts.n_correct
                    window["tokens"] += parts.n_tokens
                    del parts
            max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            scaler.step(optimizer)  # optimizer.step(), unless fp16 gradients overflowed
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if is_dpo:  # both rows of every pair went through the model
                state["trained_tokens"] += sum(len(train_examples[2 * p + side].input_ids)
                                               for rows in groups[g] for row in rows for p in row for side in (0, 1))
            else:
                state["trained_tokens"] += sum(lengths[i] for rows in groups[g] for row in rows for i in row)
            state["supervised_tokens"] += n_sup
            state["step"] = step
            state["epoch"], state["group"] = (epoch, g + 1) if g + 1 < len(groups) else (epoch + 1, 0)

            if not plan.is_logged(step):
                continue
            metrics: dict[str, Any] = {
                "step": step,
                "train_loss": window["loss"] / max(window["tokens"], 1),
                "train_mean_token_accuracy": window["correct"] / max(window["tokens"], 1),
                "learning_rate": lr,
                "grad_norm": grad_norm,
                "trained_tokens": state["trained_tokens"],
                "elapsed_s": round(time.perf_counter() - started, 3),
            }
            window = {"loss": 0.0, "correct": 0, "tokens": 0}
            if is_dpo:
                metrics.pop("train_mean_token_accuracy")
                metrics.update({("train_loss" if k == "loss" else k): v for k, v in dpo.window_metrics(pair_window).items()})
                pair_window = dpo.new_window()
                if step in plan.eval_steps and valid_examples:
                    metrics.update(_dpo_eval(model, valid_examples, state["reference"]["valid"], config, pad_id,
                                             device, autocast, "valid_"))
                if step == plan.total_steps and all_valid_examples:  # See Note: full validation
                    metrics.update(_dpo_eval(model, all_valid_examples, state["reference"]["valid"], config, pad_id,
                                             device, autocast, "full_valid_"))
            if step in plan.eval_steps and valid_batches:
                metrics.update(evaluate(model, valid_batches, device, autocast))
            if step == plan.total_steps and all_valid_examples and not is_dpo:  # See Note: full validation
                whole = len(valid_examples) == len(all_valid_examples) and "valid_loss" in metrics
                metrics.update(full_evaluation(model, all_valid_examples, valid_plan(all_valid_examples, config),
                                               pad_id, device, autocast, metrics if whole else None))
            state["history"].append(metrics)
            cb.on_metrics(step, metrics)

            # ---- checkpoint -----------------------------------------------------------------
            if step in plan.checkpoint_steps:
                # Asked before the write and again right before its rename: a process frozen in
                # between (See Note: stalled holders in worker/runner.py) publishes nothing.
                path = ckpt.save_checkpoint(model, output_dir, step,
                                            _checkpoint_state(state, optimizer, scheduler, config, compute_dtype, scaler),
                                            may_publish=lambda: cb.may_write(step))
                if path is None:
                    return _result("stopped", step, plan, state, output_dir, None)
                cb.on_checkpoint(step, path, metrics)

    # ---- cleanup / final adapter ----------------------------------------------------------------
    adapter_dir = ckpt.save_adapter(model, output_dir, may_publish=lambda: cb.may_write(step))
    if adapter_dir is None:
        return _result("stopped", step, plan, state, output_dir, None)
    cb.on_message("info", f"training complete: {step} steps, {state['trained_tokens']} tokens; adapter at {adapter_dir}")
    return _result("completed", step, plan, state, output_dir, adapter_dir)


def _pair_batches(rows: list, config: TrainConfig) -> list[list[int]]:
    """Pair indices in micro-batches of `batch_size` pairs, in file order (reference and evaluation passes)."""
    n = len(rows) // 2
    return [list(range(i, min(i + config.batch_size, n))) for i in range(0, n, config.batch_size)]


def _dpo_micro_batches(model: Any, group: list[list[list[int]]], rows: list, reference: torch.Tensor,
                       config: TrainConfig, pad_id: int, device: torch.device, autocast: Any,
                       scaler: torch.amp.GradScaler, window: dict) -> int:
    """Forward and backward one optimizer step's micro-batches of pairs; returns its supervised tokens.

    Each micro-batch's summed pair losses are divided by the pairs of the whole step, so the
    accumulated gradient is that of the mean over the step's pairs (as Note: accumulation
    normalisation does with tokens for the supervised loss).
    """
    from qlora_core import dpo

    n_pairs = sum(len(row) for micro in group for row in micro)
    n_sup = 0
    for micro in group:
        pairs = [p for row in micro for p in row]
        b = {k: v.to(device) for k, v in dpo.collate_pairs(rows, pairs, pad_id).items()}
        n_sup += count_supervised(b["labels"])
        with autocast:
            stats = dpo.dpo_loss(dpo.sequence_logps(model, b), reference[torch.tensor(pairs)], config.dpo_beta)
        scaler.scale(stats.loss_sum / max(n_pairs, 1)).backward()  # See Note: fp16 loss scaling
        dpo.add_to_window(window, stats)
        del stats
    return n_sup


def _dpo_eval(model: Any, rows: list, reference: torch.Tensor, config: TrainConfig, pad_id: int,
              device: torch.device, autocast: Any, prefix: str) -> dict[str, float]:
    from qlora_core import dpo

    return dpo.evaluate_pairs(model, rows, _pair_batches(rows, config), reference[: len(rows) // 2], config.dpo_beta,
                              pad_id, device, autocast, prefix)


# Note: exact resume. A checkpoint taken after optimizer step k holds the adapter, the optimizer
# and scheduler state, the Python/NumPy/torch RNG states at that instant (LoRA dropout draws from
# torch's global RNG), and the data position (epoch, next step group). The batch plan of an epoch
# is a pure function of (lengths, seed, epoch), so it is recomputed, not stored. Restoring all of
# this after setup (which itself consumes RNG for LoRA init) makes steps k+1.. replay exactly:
# on CPU the resumed adapter is bitwise equal to the uninterrupted one (tests/qlora_core/test_train.py).


def _checkpoint_state(state: dict, optimizer: torch.optim.Optimizer, scheduler: Any, config: TrainConfig,
                      compute_dtype: str, scaler: torch.amp.GradScaler) -> dict:
    return {
        **state,
        "history": list(state["history"]),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": ckpt.capture_rng_state(),
        "config": config.to_dict(),
        "compute_dtype": compute_dtype,  # as resolved on this device (config may say "auto")
        "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,  # See Note: fp16 loss scaling
    }


def _check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    current = config.to_dict()
    defaults = TrainConfig().to_dict()  # a checkpoint from before an option existed ran under its default
    changed = sorted(k for k in current if k not in _RESUME_SAFE_FIELDS and saved.get(k, defaults[k]) != current[k])
    if changed:
        raise TrainingError(
            f"checkpoint {path} was made with different settings ({', '.join(changed)}); "
            "resume with the same config or start a new output_dir"
        )


def _keep_4bit_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during evaluation.

    # Note: CPU inference repacking. bitsandbytes 0.50's `Linear4bit.forward`, on an AVX512-BF16 CPU
    # in eval mode without grad, rewrites the weight in place into a layout for its fused gemv and
    # expands double-quantized scales; `state_dict()` (every adapter save) converts it back
    # "best-effort". After one evaluation the frozen base computes slightly differently, so a run
    # that evaluated is not reproducible from its checkpoint. Training keeps the trained layout.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _report_stats(cb: TrainingCallback, name: str, stats: Any, max_seq_length: int) -> None:
    cb.on_message(
        "info",
        f"{name} data: {stats.n_examples} examples, {stats.n_tokens} tokens "
        f"({stats.n_supervised_tokens} supervised)",
    )
    if stats.n_truncated:
        cb.on_message("warn", f"{name} data: {stats.n_truncated} example(s) truncated to max_seq_length={max_seq_length}")
    if stats.n_dropped:
        cb.on_message("warn", f"{name} data: {stats.n_dropped} example(s) dropped (longer than {max_seq_length} tokens or nothing to learn)")


def _result(status: str, step: int, plan: RunPlan, state: dict, output_dir: Path, adapter_dir: Path | None) -> TrainResult:
    last = dict(state["history"][-1]) if state["history"] else {}
    last["supervised_tokens"] = state["supervised_tokens"]
    return TrainResult(
        status=status,
        steps=step,
        total_steps=plan.total_steps,
        trained_tokens=state["trained_tokens"],
        adapter_dir=adapter_dir,
        checkpoints=ckpt.list_checkpoints(output_dir),
        metrics=last,
    )


def _is_cpu_oom(exc: RuntimeError) -> bool:
    text = str(exc)
    return "can't allocate memory" in text or "DefaultCPUAllocator" in text or "out of memory" in text.lower()


def _oom_advice(config: TrainConfig, exc: BaseException) -> str:
    tips = [f"batch_size (now {config.batch_size}; raise gradient_accumulation_steps to keep the effective batch)"]
    tips.append(f"max_seq_length (now {config.max_seq_length})")
    tips.append(f"lora_r (now {config.lora_r})")
    if not config.gradient_checkpointing:
        tips.append("or enable gradient_checkpointing")
    return f"out of memory during training: lower {', '.join(tips)}. ({str(exc).splitlines()[0][:200]})"
