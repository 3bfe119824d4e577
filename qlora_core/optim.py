"""Optimizer and learning-rate schedule for a QLoRA run.

The QLoRA paper (section 3, "Paged Optimizers") pages AdamW's state to CPU memory through NVIDIA
unified memory so that a long sequence's memory spike does not kill the run; `artidoro/qlora`
defaults to `paged_adamw_32bit`. Paging only means something on CUDA: bitsandbytes 0.50 runs its
optimizers on CPU but falls back to non-paged state there (with its own UserWarning). We make that
choice ourselves, up front, and say so in the job's events rather than in a stray Python warning.

The schedules mirror `transformers.get_{constant,cosine,linear}_schedule_with_warmup`, written as a
`LambdaLR` so that their state is a plain step counter that checkpoints and resumes exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch

logger = logging.getLogger(__name__)

MessageFn = Callable[[str, str], None]

# name -> (bitsandbytes class on CUDA, bitsandbytes class without CUDA)
_BNB_OPTIMIZERS = {
    "paged_adamw_32bit": ("PagedAdamW32bit", "AdamW32bit"),
    "paged_adamw_8bit": ("PagedAdamW8bit", "AdamW8bit"),
    "adamw_32bit": ("AdamW32bit", "AdamW32bit"),
    "adamw_8bit": ("AdamW8bit", "AdamW8bit"),
}


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str,
    learning_rate: float,
    weight_decay: float,
    device: torch.device,
    on_message: MessageFn | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer named in `TrainConfig.optimizer`.

    Args:
        params: the trainable parameters (the LoRA matrices).
        name: one of `qlora_core.config.OPTIMIZERS`.
        learning_rate: peak learning rate (the schedule scales it).
        weight_decay: decoupled weight decay, as in AdamW.
        device: where the parameters live; paging is only possible on CUDA.
        on_message: `(level, message)` sink for user-visible notes about fallbacks.

    Returns:
        A `torch.optim.Optimizer` (bitsandbytes optimizers subclass it).

    Raises:
        ValueError: if `name` is not a known optimizer.
    """
    say = on_message or (lambda level, msg: logger.info(msg))
    params = list(params)
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    if name not in _BNB_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(_BNB_OPTIMIZERS) + ['adamw_torch']}")

    import bitsandbytes as bnb

    cuda_cls, cpu_cls = _BNB_OPTIMIZERS[name]
    cls_name = cuda_cls if device.type == "cuda" else cpu_cls
    if cls_name != cuda_cls:
        say("warn", f"optimizer {name}: paged optimizers need CUDA; running bitsandbytes {cls_name} (not paged) on {device.type}")
    try:
        optimizer = getattr(bnb.optim, cls_name)(params, lr=learning_rate, weight_decay=weight_decay)
        _probe(optimizer, params)
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        # An older bitsandbytes has no CPU optimizer kernels; training must still run.
        say("warn", f"optimizer {name}: bitsandbytes {cls_name} failed on {device.type} ({exc}); using torch.optim.AdamW")
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    return optimizer


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> int:
    """Load a checkpoint's optimizer state, keeping a paged optimizer's state in paged memory.

    # Note: paged state after a resume. bitsandbytes allocates a paged optimizer's state (for
    # parameters of 1e5 elements or more) with `cudaMallocManaged`, so the driver can evict it to
    # host memory under pressure: that is what "paged" buys (QLoRA section 3). Its
    # `load_state_dict` keeps the checkpoint's tensors where they were loaded (the CPU here) and
    # its first step moves them to the GPU as ordinary device memory: a resumed run would silently
    # stop paging. So the loaded values are copied into fresh paged buffers.

    Args:
        optimizer: the run's optimizer, built for the current parameters.
        state_dict: what `optimizer.state_dict()` returned when the checkpoint was written.

    Returns:
        How many state tensors were moved into paged memory (0 for a non-paged optimizer or on CPU).
    """
    optimizer.load_state_dict(state_dict)
    if not getattr(optimizer, "is_paged", False):
        return 0
    moved = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.device.type != "cuda" or p not in optimizer.state:
                continue
            for key, value in optimizer.state[p].items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and not getattr(value, "is_paged", False):
                    buf = optimizer.get_state_buffer(p, dtype=value.dtype)
                    if getattr(buf, "is_paged", False):
                        buf.copy_(value)
                        optimizer.state[p][key] = buf
                        moved += 1
    return moved


def _probe(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """Run one zero-learning-rate step on a scratch copy so a missing kernel fails now, not at step 1."""
    if not params:
        return
    scratch = torch.nn.Parameter(torch.zeros(64, 64, device=params[0].device, dtype=params[0].dtype))
    probe = type(optimizer)([scratch], lr=0.0)
    scratch.grad = torch.zeros_like(scratch)
    probe.step()


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at each step (linear warmup, then the schedule).

    Raises:
        ValueError: if `schedule` is unknown.
    """
    if schedule not in ("constant", "constant_with_warmup", "cosine", "linear"):
        raise ValueError(
            f"unknown lr_scheduler {schedule!r}; expected constant, constant_with_warmup, cosine or linear"
        )
    # Note: constant means constant. transformers' `get_scheduler("constant")` ignores the warmup,
    # so the QLoRA repository (constant, warmup_ratio 0.03) trains at the full rate from step 1;
    # we do the same, and `constant_with_warmup` is there for those who want the ramp.
    if schedule == "constant":
        warmup_steps = 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            # Note: warmup from lr/(w+1), not from 0 as transformers does, so that no step is wasted.
            return float(step + 1) / float(warmup_steps + 1)
        if schedule in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_ratio: float
) -> tuple[torch.optim.lr_scheduler.LambdaLR, int]:
    """Build the learning-rate schedule.

    Returns:
        `(scheduler, warmup_steps)` with `warmup_steps = ceil(warmup_ratio * total_steps)`, as in
        `transformers.TrainingArguments.get_warmup_steps`.
    """
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup_steps, total_steps)), warmup_steps
