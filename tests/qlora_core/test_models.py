"""Tests for qlora_core.models: 4-bit loading with bitsandbytes, tokenizer, LoRA wrapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qlora_core.models import add_lora, load_quantized_model, load_tokenizer, resolve_dtype


def test_tokenizer_pads_right_with_a_pad_token(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(tiny_model_dir)
    assert tok.pad_token is not None and tok.padding_side == "right"
    batch = tok(["The answer is 7.", "Hi"], padding=True)
    assert batch["input_ids"][1][-1] == tok.pad_token_id and batch["attention_mask"][1][-1] == 0


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True)])
def test_linear_layers_are_4bit_as_asked(tiny_model_dir: Path, quant_type: str, double_quant: bool) -> None:
    import bitsandbytes as bnb

    model = load_quantized_model(tiny_model_dir, quant_type=quant_type, double_quant=double_quant, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q k v o gate up down in each of 2 blocks; lm_head stays 16-bit
    for layer in layers:
        assert isinstance(layer.weight, bnb.nn.Params4bit)
        state = layer.weight.quant_state
        assert state.quant_type == quant_type and state.nested is double_quant
        assert (state.state2 is not None) is double_quant
        assert state.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
    assert model.config._attn_implementation == "sdpa"
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_quantized_model_still_predicts_like_the_original(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    q = load_quantized_model(tiny_model_dir, device="cpu")
    with torch.no_grad():
        ref = full(input_ids=ids).logits
        got = q(input_ids=ids).logits.float()
    # 4-bit weights perturb logits by a few percent of their norm; a wrong data type, scale or
    # layout gives an error of the order of the logits themselves.
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.15, rel


def test_bad_options_are_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="quant_type"):
        load_quantized_model(tiny_model_dir, quant_type="int4")
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8")
    model = load_quantized_model(tiny_model_dir, device="cpu")
    with pytest.raises(ValueError, match="lora_r"):
        add_lora(model, 0, 16, 0.0)


@pytest.mark.parametrize("gradient_checkpointing", [True, False])
def test_lora_trains_only_adapters_and_lowers_the_loss(tiny_model_dir: Path, gradient_checkpointing: bool) -> None:
    torch.manual_seed(0)
    model = add_lora(load_quantized_model(tiny_model_dir, device="cpu"), 8, 16, 0.0,
                     gradient_checkpointing=gradient_checkpointing)  # fmt: skip
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert len(trainable) == 2 * 7 * 2  # A and B on every linear layer of both blocks
    assert model.base_model.model.is_gradient_checkpointing is gradient_checkpointing
    tok = load_tokenizer(tiny_model_dir)
    ids = torch.tensor([tok("The capital of France is Paris.")["input_ids"]] * 4)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("fraction, expected", [(1.0, 2), (0.5, 1), (0.0, 0)])
def test_selective_checkpointing_keeps_the_gradients(tiny_model_dir: Path, fraction: float, expected: int) -> None:
    """Checkpointing fewer layers changes memory and time, never the gradients."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from qlora_core.models import select_checkpointed_layers

    batch = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = {}
    for frac in (1.0, fraction):
        torch.manual_seed(0)
        model = add_lora(load_quantized_model(tiny_model_dir, compute_dtype="float32"), 4, 8, 0.0,
                         checkpoint_fraction=frac)
        model.train()
        n_checkpointed = sum(1 for m in model.modules()
                             if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing)
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        grads[frac] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    assert n_checkpointed == expected  # the tiny model has 2 decoder layers
    for a, b in zip(grads[1.0], grads[fraction]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="checkpoint_fraction"):
        select_checkpointed_layers(model, 1.5)
