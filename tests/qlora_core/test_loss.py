"""The supervised-positions-only loss equals the full-logits loss, value and gradient."""

from __future__ import annotations

import pytest
import torch

from qlora_core import loss as loss_mod
from qlora_core.loss import IGNORE_INDEX, causal_lm_loss, count_supervised, supports_supervised_logits


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    input_ids = torch.randint(3, 300, (3, 20), generator=gen)  # (B, T)
    labels = input_ids.clone()
    labels[:, :8] = IGNORE_INDEX  # a prompt
    labels[1, 15:] = IGNORE_INDEX  # padding
    # two packed examples in row 2: positions restart at 11
    position_ids = torch.cat([torch.arange(11), torch.arange(9)]).repeat(3, 1)
    position_ids[:2] = torch.arange(20)
    labels[2, 11] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


@pytest.mark.parametrize("gradient_in_forward", [True, False])  # LinearCrossEntropy, or checkpointed chunks
@pytest.mark.parametrize("chunk", [256, 7])  # one chunk; several chunks with a ragged last one
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_supervised_only_matches_full_logits(model, dtype, chunk, gradient_in_forward, monkeypatch):
    monkeypatch.setattr(loss_mod, "CE_CHUNK", chunk)
    if not gradient_in_forward:
        monkeypatch.setattr(loss_mod, "_frozen_plain_head", lambda head: False)
    batch = _batch()
    results = {}
    for supervised_only in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            parts = causal_lm_loss(model, batch, supervised_only=supervised_only)
        parts.loss_sum.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results[supervised_only] = (parts, grads)
    (fast, fast_grads), (full, full_grads) = results[True], results[False]
    assert fast.n_tokens == full.n_tokens == count_supervised(batch["labels"]) == 12 + 7 + 11
    assert fast.n_correct == full.n_correct
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(fast.loss_sum, full.loss_sum, rtol=tol, atol=tol)
    for key in full_grads:
        # Chunks sum their gradients in another order than one (N, V) block: fp32 rounding, ~1e-6.
        torch.testing.assert_close(fast_grads[key], full_grads[key], rtol=max(tol, 1e-4), atol=tol)


def test_loss_is_a_token_sum(model):
    """Summed, not averaged: two halves of a batch add up to the whole (what accumulation needs)."""
    batch = _batch()
    with torch.no_grad():
        whole = causal_lm_loss(model, batch).loss_sum
        halves = sum(causal_lm_loss(model, {k: v[i : i + 1] for k, v in batch.items()}).loss_sum for i in range(3))
    torch.testing.assert_close(halves, whole, rtol=1e-5, atol=1e-5)


def test_logit_softcapping_falls_back_to_full_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    assert supports_supervised_logits(model)
    model.config.final_logit_softcapping = 30.0
    assert not supports_supervised_logits(model)


def test_a_batch_without_supervised_tokens_backprops_zero(model):
    batch = _batch()
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    parts = causal_lm_loss(model, batch)
    parts.loss_sum.backward()  # must not raise: accumulation feeds such micro-batches too
    assert parts.n_tokens == 0 and float(parts.loss_sum) == 0.0
