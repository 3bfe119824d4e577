"""Validation passes of a training run: the periodic evaluation and the final one over the whole file.

Both report what OpenAI's metrics events carry: a token-weighted mean loss and token accuracy over
the supervised positions (`qlora_core.loss.causal_lm_loss`, the training loss's own definition),
with dropout off. The final pass also measures the base model on the same file, with the adapter
switched off by PEFT's `PeftModel.disable_adapter()` (See Note: full validation).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from qlora_core import data
from qlora_core.loss import causal_lm_loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict], device: torch.device, autocast: Any) -> dict[str, float]:
    """Token-weighted mean loss and accuracy over the validation batches (dropout off).

    Args:
        model: the model being trained; it is back in train mode on return.
        batches: collated batches (`qlora_core.data.collate`).
        device: where the model is.
        autocast: the run's autocast context (or a null context in fp32).

    Returns:
        `valid_loss` and `valid_mean_token_accuracy`.
    """
    model.eval()
    loss, correct, tokens = 0.0, 0, 0
    try:
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            with autocast:
                parts = causal_lm_loss(model, b)
            loss += float(parts.loss_sum)
            correct += parts.n_correct
            tokens += parts.n_tokens
    finally:
        model.train()
    return {"valid_loss": loss / max(tokens, 1), "valid_mean_token_accuracy": correct / max(tokens, 1)}


# Note: full validation. As on OpenAI, the last step of a run with a validation file reports
# `full_valid_loss` and `full_valid_mean_token_accuracy` over the *whole* file (the evaluations
# during training see at most `max_eval_examples`), and beside them `base_full_valid_loss` /
# `base_full_valid_mean_token_accuracy`: the same pass with the adapter disabled (PEFT's
# `disable_adapter()`), i.e. the 4-bit base model alone, so the gain from fine-tuning is one
# subtraction. `qlora_core.train` runs it after the last optimizer step and before that step's
# metrics event and checkpoint, so it is part of the step: a run killed before the final checkpoint
# replays the step and recomputes it (the event's dedup key keeps it to one event), and a run
# resumed from the final checkpoint finds it in the checkpoint's history. Neither pass draws random
# numbers (dropout is off in eval mode), so exact resume is untouched.


def full_evaluation(
    model: Any,
    examples: list,
    plan: list[list[list[int]]],
    pad_id: int,
    device: torch.device,
    autocast: Any,
    known: dict[str, Any] | None = None,
) -> dict[str, float]:
    """The whole validation file, with the adapter and without it (See Note: full validation).

    Args:
        model: the `peft.PeftModel` being trained.
        examples: every tokenized example of the validation file.
        plan: its micro-batches (`qlora_core.plan.valid_plan`); each is collated only when it is
            evaluated, so the whole file's tensors are never held at once.
        pad_id: the tokenizer's padding id.
        device: where the model is.
        autocast: the run's autocast context.
        known: this step's `evaluate` result when that already covered the whole file (no
            `max_eval_examples` cap), so the adapter's pass is not repeated; else None.

    Returns:
        `full_valid_loss`, `full_valid_mean_token_accuracy`, `base_full_valid_loss`,
        `base_full_valid_mean_token_accuracy`.
    """

    def batches() -> Iterator[dict]:
        return (data.collate(examples, rows, pad_id) for rows in plan)

    tuned = known if known is not None else evaluate(model, batches(), device, autocast)
    with model.disable_adapter():
        base = evaluate(model, batches(), device, autocast)
    return {
        "full_valid_loss": tuned["valid_loss"],
        "full_valid_mean_token_accuracy": tuned["valid_mean_token_accuracy"],
        "base_full_valid_loss": base["valid_loss"],
        "base_full_valid_mean_token_accuracy": base["valid_mean_token_accuracy"],
    }
