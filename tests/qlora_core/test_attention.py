"""qlora_core/attention.py: sdpa's forward, a backward with fp32 arithmetic, everything else sdpa's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qlora_core.attention import ATTENTION, FlashAttentionCpu
from qlora_core.models import add_lora, load_quantized_model


def _qkv(kv_heads: int, seed: int = 0) -> list[torch.Tensor]:
    """bf16 q (2, 9, 70, 64), k and v (2, kv_heads, 70, 64), laid out as a model makes them
    (B, T, H, D) in memory, seen as (B, H, T, D)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 70, heads, 64, generator=g).to(torch.bfloat16).transpose(1, 2) for heads in (9, kv_heads, kv_heads)]


def _attention_and_grads(fn, inputs: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("kv_heads", [9, 3])  # 3: SmolLM2's grouped K/V heads
def test_forward_is_sdpa_and_gradients_are_closer_to_exact(kv_heads: int) -> None:
    """The output is bitwise sdpa's; the gradients are closer to fp64 attention's than the bf16
    kernel's are, and within bf16 rounding of fp32 attention's on the same inputs."""
    inputs = _qkv(kv_heads)
    grad = torch.randn(2, 9, 70, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    gqa = kv_heads != 9

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=gqa)

    ours = _attention_and_grads(lambda q, k, v: FlashAttentionCpu.apply(q, k, v, 0.125), inputs, grad)
    bf16 = _attention_and_grads(sdpa, inputs, grad)
    fp32 = _attention_and_grads(sdpa, [t.float() for t in inputs], grad)
    exact = _attention_and_grads(sdpa, [t.double() for t in inputs], grad)
    assert torch.equal(ours[0], bf16[0])
    for i in (1, 2, 3):
        assert ours[i].dtype == torch.bfloat16 and ours[i].shape == inputs[i - 1].shape
        err = {name: float((got[i].double() - exact[i]).norm() / exact[i].norm()) for name, got in
               (("ours", ours), ("bf16 kernel", bf16), ("fp32", fp32))}
        assert err["ours"] < err["bf16 kernel"] and err["ours"] < 1e-2, (i, err)


def _model(tiny_model_dir: Path, compute_dtype: str = "bfloat16") -> torch.nn.Module:
    torch.manual_seed(0)
    model = add_lora(load_quantized_model(tiny_model_dir, device="cpu", compute_dtype=compute_dtype), 8, 16, 0.0,
                     gradient_checkpointing=False, fused_layers=True)  # fmt: skip
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
    return model.train()


def _step(model: torch.nn.Module, ids: torch.Tensor, bf16: bool = True, **inputs: torch.Tensor):  # type: ignore[no-untyped-def]
    """Logits, loss and LoRA gradients of one forward/backward."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=ids, labels=ids, use_cache=False, **inputs)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), [p.grad.clone() for _, p in sorted(model.named_parameters())
                                                    if p.requires_grad]


def test_a_bf16_training_step_has_sdpas_loss_and_its_gradients_to_bf16_rounding(tiny_model_dir: Path) -> None:
    model = _model(tiny_model_dir)
    base = model.get_base_model()
    assert base.config._attn_implementation == ATTENTION  # add_lora(fused_layers=True) switched it
    ids = torch.randint(3, 300, (3, 40), generator=torch.Generator().manual_seed(2))
    ours = _step(model, ids)
    base.set_attn_implementation("sdpa")
    stock = _step(model, ids)
    assert torch.equal(ours[0], stock[0]) and torch.equal(ours[1], stock[1])
    assert len(ours[2]) == 2 * 7 * 2
    for got, want in zip(ours[2], stock[2]):
        # q/k/v gradients through a bf16 attention backward either way: ~1 % apart (bf16's eps is 0.8 %)
        assert float((got - want).norm() / want.norm()) < 3e-2


def test_what_it_does_not_cover_is_sdpa_bitwise(tiny_model_dir: Path) -> None:
    """fp32 compute, packed rows (a block-diagonal mask), evaluation without gradients and
    generation with a cache take transformers' own sdpa function: the same bits."""
    ids = torch.randint(3, 300, (2, 30), generator=torch.Generator().manual_seed(3))
    packed = torch.cat([torch.arange(12), torch.arange(18)]).repeat(2, 1)  # two examples per row
    for compute_dtype, inputs in (("float32", {}), ("bfloat16", {"position_ids": packed})):
        model = _model(tiny_model_dir, compute_dtype)
        bf16 = compute_dtype == "bfloat16"
        runs = []
        for implementation in (ATTENTION, "sdpa"):
            model.get_base_model().set_attn_implementation(implementation)
            grads = _step(model, ids, bf16, **inputs)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids, use_cache=False).logits
                generated = model.generate(input_ids=ids[:1, :8], max_new_tokens=5, do_sample=False)
            runs.append([grads[0], grads[1], *grads[2], logits, generated])
        assert all(torch.equal(a, b) for a, b in zip(*runs)), compute_dtype


def test_a_saved_adapter_names_no_private_attention(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The adapter a user downloads loads anywhere: the training-only attention is not in it."""
    _model(tiny_model_dir).save_pretrained(str(tmp_path / "adapter"))
    texts = [p.read_text() for p in (tmp_path / "adapter").iterdir() if p.suffix == ".json"]
    assert texts and not [t for t in texts if ATTENTION in t]


def test_rows_past_the_cpus_fp32_length_take_sdpas_backward_bitwise(tiny_model_dir: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Where the bf16 kernel's backward is the faster one (long rows on CPUs without AMX), a step is
    sdpa's to the bit; rows within the limit take the fp32 backward (gradients differ in the last bits)."""
    from qlora_core import attention

    model = _model(tiny_model_dir)
    base = model.get_base_model()
    ids = torch.randint(3, 300, (2, 30), generator=torch.Generator().manual_seed(4))
    base.set_attn_implementation("sdpa")
    stock = _step(model, ids)
    base.set_attn_implementation(ATTENTION)
    monkeypatch.setattr(attention, "fp32_backward_max_len", lambda: 29)
    past = _step(model, ids)
    assert all(torch.equal(a, b) for a, b in zip([past[0], past[1], *past[2]], [stock[0], stock[1], *stock[2]]))
    monkeypatch.setattr(attention, "fp32_backward_max_len", lambda: 30)
    within = _step(model, ids)
    assert torch.equal(within[0], stock[0]) and torch.equal(within[1], stock[1])  # the same forward
    assert any(not torch.equal(a, b) for a, b in zip(within[2], stock[2]))  # another backward


def test_the_fp32_backward_length_follows_the_cpu(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from qlora_core import attention, device

    try:
        attention.fp32_backward_max_len.cache_clear()
        monkeypatch.setattr(device, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})  # AMD EPYC's bf16
        assert attention.fp32_backward_max_len() == attention.FP32_BACKWARD_MAX_LEN == 256
        attention.fp32_backward_max_len.cache_clear()
        monkeypatch.setattr(device, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
        assert attention.fp32_backward_max_len() is None
    finally:
        attention.fp32_backward_max_len.cache_clear()  # the next caller reads this machine's flags
