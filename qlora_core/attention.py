"""Causal self-attention for bf16 training on the CPU, with its backward computed in fp32.

# Note: attention backward in fp32 on the CPU
torch's CPU flash-attention kernels (`_scaled_dot_product_flash_attention_for_cpu` and its
backward, what `F.scaled_dot_product_attention` runs for a causal batch without a mask) are far
apart in bf16: the forward is fast, the backward is several times slower than the same backward in
fp32 on the same tensors. Measured for one SmolLM2-135M attention layer (9 query heads, 3 K/V
heads, head dim 64; `python bench/bench_attention.py`), milliseconds for the backward:

    Intel Xeon, AMX-BF16                 B×T = 4×55   4×200   1×900
      bf16 kernel                             4.9    10.8    20.3
      fp32 kernel (inputs upcast)             0.7     4.7    22.6
    the same host with oneDNN capped at AVX512_CORE_BF16 (no AMX, like AMD EPYC's bf16)
      bf16 kernel                             5.1    21.7    37.4
      fp32 kernel                             0.8     6.5    22.4

On a real AMD EPYC with AVX512-BF16 (CPU family 26, no AMX) the fp32 kernel wins only on short
rows: backward in ms, bf16 kernel against fp32 (`python bench/bench_attention.py`, and the same two
kernels timed alone at more lengths):

    AMD EPYC family 26, AVX512-BF16      B×T = 8×55  4×200  2×300  2×400  1×512  1×900  1×1400
      bf16 kernel                            4.1    6.7    5.9    9.3    8.8   15.0   33.5
      fp32 kernel                            1.1    6.0    6.3   10.5   10.6   25.0   52.7

So the fp32 backward is taken for rows of at most `FP32_BACKWARD_MAX_LEN` (256) tokens, and at any
length on a CPU with AMX-BF16 (the Intel host above gained at every length measured); longer rows
elsewhere keep sdpa's bf16 backward (`fp32_backward_max_len`).

Under bf16 compute on the CPU, then, `FlashAttentionCpu` runs the forward with the bf16 kernel
(exactly what sdpa computes: the same output, the same logits and loss) and the backward with the
fp32 kernel on upcast copies of what the forward kept, casting the three gradients back to bf16.
The gradients are those of the same attention computed with fp32 arithmetic, closer to exact than
the bf16 kernel's (tests/qlora_core/test_attention.py); memory is unchanged but for fp32 copies of
one layer's q, k, v, output and output gradient while that layer's backward runs.

It covers what a training step on the CPU runs: causal attention without a mask (unpacked batches,
See Note: packed attention in qlora_core/data.py), K/V heads shared by several query heads (the
kernel takes them natively, as sdpa does when there is no mask), no dropout. Anything else (a
mask, a cache, dropout, softcapping, fp32 or fp16 compute, a GPU, no gradient wanted) goes to
transformers' own sdpa function unchanged.

It is registered with transformers as `ATTENTION` ("qlora_sdpa"), for attention and for masks
(sdpa's mask builder, so masks are built exactly as for "sdpa"); `use_cpu_attention` switches one
model to it.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

ATTENTION = "qlora_sdpa"
FP32_BACKWARD_MAX_LEN = 256  # See Note: attention backward in fp32 (the AMD family-26 crossover)


@functools.cache
def fp32_backward_max_len() -> int | None:
    """The longest row whose attention backward runs in fp32 on this CPU; None: any length."""
    from qlora_core.device import cpu_flags

    return None if "amx_bf16" in cpu_flags() else FP32_BACKWARD_MAX_LEN


class FlashAttentionCpu(torch.autograd.Function):
    """Causal attention: bf16 forward kernel, fp32 backward kernel (See Note: attention backward in fp32).

    Inputs: q (B, H, T, D), k and v (B, Hkv, T, D) with H a multiple of Hkv, all bf16.
    Output: (B, H, T, D), as `F.scaled_dot_product_attention` returns it.
    """

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, True, attn_mask=None, scale=scale)  # out (B, H, T, D), logsumexp (B, H, T) fp32
        ctx.save_for_backward(query, key, value, out, logsumexp)  # what sdpa's own node keeps
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (*causal_backward_fp32(grad_out, *ctx.saved_tensors, scale=ctx.scale), None)


def causal_backward_fp32(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         out: torch.Tensor, logsumexp: torch.Tensor, scale: float | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CPU flash kernel's causal backward run in fp32 on upcast copies of bf16 tensors; the
    gradients of q, k and v come back in their dtypes (See Note: attention backward in fp32)."""
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.float(), query.float(), key.float(), value.float(), out.float(), logsumexp, 0.0, True,
        attn_mask=None, scale=scale)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (query, key, value)))  # type: ignore[return-value]


def _covered(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, dropout: float, is_causal: bool | None, kwargs: dict) -> bool:
    """True when `FlashAttentionCpu` computes what transformers' sdpa function would."""
    if not torch.is_grad_enabled() or not (query.requires_grad or key.requires_grad or value.requires_grad):
        return False  # no backward to run
    if attention_mask is not None or dropout != 0.0 or query.device.type != "cpu":
        return False
    if any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "cache", "sliding_window")):
        return False
    if kwargs.get("output_attentions") or not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        return False
    if query.dim() != 4 or query.shape[2] < 2 or key.shape[2] != query.shape[2]:
        return False  # decoding, or a prefilled cache
    limit = fp32_backward_max_len()
    if limit is not None and query.shape[2] > limit:
        return False  # rows this long have a faster bf16 backward on this CPU
    if {query.dtype, key.dtype, value.dtype} != {torch.bfloat16} or key.shape[-1] != value.shape[-1]:
        return False
    return query.shape[1] % key.shape[1] == 0 and key.shape[1] == value.shape[1]


def cpu_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: returns ((B, T, H, D), None), as sdpa's does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")  # what autocast makes of scaled_dot_product_attention's inputs
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if not _covered(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    with torch.autocast("cpu", enabled=False):  # the inputs already have autocast's dtype
        out = FlashAttentionCpu.apply(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, cpu_attention_forward)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_cpu_attention(model: torch.nn.Module) -> bool:
    """Switch `model` (a PeftModel or a transformers model) from "sdpa" to `ATTENTION`.

    Returns:
        True if switched (or already on it); False, leaving the model as it is, when it does not
        use "sdpa" or cannot change its attention implementation.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current not in ("sdpa", ATTENTION) or not hasattr(base, "set_attn_implementation"):
        return False
    _register()
    base.set_attn_implementation(ATTENTION)
    return base.config._attn_implementation == ATTENTION
