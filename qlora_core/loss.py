"""Causal-LM loss computed only where it counts: at the supervised positions.

A decoder's largest single matmul in fine-tuning is often the output projection: (B*T, H) @ (H, V)
with V = 49,152 for SmolLM2, followed by a (B*T, V) fp32 softmax. With the loss on completions only
(the QLoRA recipe), most positions are prompt or padding and their logits are thrown away. So we
run the decoder body, keep the hidden states at positions whose *next* token is supervised, and
project just those: (N, H) -> (N, V) with N the number of supervised tokens. The same idea is
torchtune's "chunked/masked output" and Liger's fused linear cross-entropy; this is its plain form.

Works for any `*ForCausalLM` that exposes `get_decoder()` and `get_output_embeddings()` and applies
no transformation to the logits (no soft-capping, no logit scale); otherwise it falls back to the
model's own full logits so the numbers stay right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# Config attributes that mean "the model post-processes its logits": the shortcut would skip them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


@dataclass
class LossParts:
    """Sums, not means, so callers can weight by tokens across micro-batches and steps."""

    loss_sum: torch.Tensor  # scalar fp32, differentiable: sum of token cross-entropies
    n_correct: int  # argmax == label at supervised positions
    n_tokens: int  # supervised positions


def count_supervised(labels: torch.Tensor) -> int:
    """Supervised positions after the causal shift (label at t+1 predicted from position t)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _split_causal_lm(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """Return (decoder body, output projection) of a (PEFT-wrapped) causal LM, or None if unknown."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    config = getattr(base, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def supports_supervised_logits(model: torch.nn.Module) -> bool:
    """Whether `causal_lm_loss(..., supervised_only=True)` can take the shortcut for this model."""
    return _split_causal_lm(model) is not None


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], supervised_only: bool = True) -> LossParts:
    """Next-token cross-entropy summed over supervised positions, and the number right.

    Args:
        model: a causal LM, optionally wrapped by PEFT.
        batch: `input_ids` (B, T), `labels` (B, T) with -100 where not supervised, and any extra
            model inputs from `qlora_core.data.collate` (attention mask, position ids).
        supervised_only: project to the vocabulary only at supervised positions (see module doc).

    Returns:
        `LossParts` with the fp32 summed loss (differentiable), correct-token and token counts.
    """
    labels = batch["labels"]  # (B, T)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    split = _split_causal_lm(model) if supervised_only else None
    target = labels[:, 1:]  # (B, T-1)
    keep = target != IGNORE_INDEX  # (B, T-1)
    if split is not None:
        decoder, head = split
        hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        picked = hidden[:, :-1][keep]  # (N, H)
        logits = head(picked)  # (N, V)
        gold = target[keep]  # (N,)
    else:
        full = model(**inputs, use_cache=False).logits  # (B, T, V)
        logits = full[:, :-1][keep]  # (N, V)
        gold = target[keep]
    # Note: fp32 cross-entropy. bf16 logits have ~3 significant digits; the log-sum-exp over 49k
    # entries in bf16 visibly biases the loss, so we upcast the (N, V) block (small, see above).
    logits = logits.float()
    loss_sum = F.cross_entropy(logits, gold, reduction="sum")
    with torch.no_grad():
        n_correct = int((logits.argmax(dim=-1) == gold).sum())
    return LossParts(loss_sum=loss_sum, n_correct=n_correct, n_tokens=int(gold.numel()))
