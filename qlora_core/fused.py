"""Memory-lean autograd for the three layer kinds every QLoRA step runs: LoRA, RMSNorm, SwiGLU.

The QLoRA recipe spends little on weights and a lot on activations, and how much autograd keeps
per token decides how many layers can skip gradient checkpointing at a given memory budget. The
stock modules keep more than the math needs. On SmolLM2-135M (30 Llama blocks, bf16 autocast,
measured with `torch.autograd.graph.saved_tensors_hooks`), one block keeps ~29 KB per token:

- PEFT's LoRA branch (`peft.tuners.lora.bnb.Linear4bit.forward`) casts its input to the fp32
  adapter dtype (PEFT tests `torch.is_autocast_enabled()`, which asks about CUDA only), and CPU
  autocast casts it back to bf16 for the matmul: two copies per call, and every one of the seven
  projections keeps its own bf16 copy of its input (~10 KB per token) although q, k and v share
  one input and the values equal the input's.
- `LlamaRMSNorm` keeps its input upcast to fp32 (2.3 KB per norm per token).
- `LlamaMLP` keeps silu(gate) beside gate and up (3 KB per token), though silu is one
  elementwise op away from gate, and the down projection keeps silu(gate) * up (3 KB), one more.

The functions below keep only the input (shared with whatever else uses it) and what is costly
to recompute, and redo the cheap elementwise parts in backward: 14.4 KB per token per block
(r=64), measured, and none of the cast copies; 16.7 KB since the residual stream they carry is
fp32 (See Note: the update summed in fp32). Each adapted projection is one autograd node
(`LoraLinear`, See Note: one node per adapted projection), and the MLP's product and down
projection another (`SwiGLUDown`). Their forwards run the same ops in the same order as the
modules they replace, except that LoRA's scaling multiplies B rather than the output (See Note:
scaling folded into B; exact for power-of-two alpha/r, the default) and that under 16-bit compute
the LoRA update is added to the base output in fp32, which makes the residual stream fp32 as the
reference recipe's is (See Note: the update summed in fp32; PEFT's own order is kept without
autograd); backward is the same math, with sums in a different order
(tests/qlora_core/test_fused.py). The idea is the one Unsloth's hand-written LoRA/MLP backward
passes use; these are plain torch ops, so they run wherever the model runs (CPU, CUDA).

`apply_fused_layers` swaps the `forward` of matching module instances (not classes, so other
models in the process are untouched); a module in a state the fused path does not cover (merged
adapter, disabled adapters, DoRA or another variant, LoRA bias, mixed-batch adapter names) calls
its original forward.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# RMSNorm classes whose forward is exactly Llama's: fp32 statistics, `weight * x_hat.to(dtype)`.
# (Gemma's uses `1 + weight` and is not in this list.)
_RMSNORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
# Projections whose outputs only feed attention, which rounds them to the compute dtype anyway:
# their LoRA update is summed in that dtype (See Note: the update summed in fp32).
_ATTENTION_INPUTS = frozenset({"q_proj", "k_proj", "v_proj"})
# MLP classes computing `down(act(gate(x)) * up(x))`; fused only when the activation is SiLU.
_SWIGLU_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


def matmul_dtype(x: torch.Tensor, fallback: torch.dtype) -> torch.dtype:
    """The dtype a matmul on `x` runs in: autocast's when it is on for x's device, else `fallback`.

    (PEFT's LoRA branch falls back to the adapter's dtype; the loss's head to the hidden states'.)
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return fallback


class LoraBranch(torch.autograd.Function):
    """out = (x @ A^T) @ (scaling * B)^T, keeping only x and x @ A^T for backward.

    The adapter weights stay in their own (fp32) dtype as leaves; they are cast to the compute
    dtype for each matmul exactly as autocast would, and the gradients are cast back.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
        xc = x.to(dtype)  # (..., K); no copy when x is already in the compute dtype
        xa = xc @ weight_a.to(dtype).t()  # (..., r)
        out = xa @ _scaled(weight_b, scaling, dtype).t()  # (..., N)
        ctx.save_for_backward(xc, xa, weight_a, weight_b)
        ctx.base_layer, ctx.scaling, ctx.x_dtype = None, scaling, x.dtype  # no base: the branch alone
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc, xa, weight_a, weight_b = ctx.saved_tensors
        grads = _lora_linear_backward(ctx, grad_out, xc, xa, weight_a, weight_b, ctx.needs_input_grad[:3])
        return (*grads, None, None)


class LoraLinear(torch.autograd.Function):
    """base(x) + (x @ A^T) @ (scaling * B)^T for a frozen base layer, as one autograd node.

    # Note: one node per adapted projection. With PEFT the base layer (bitsandbytes' MatMul4Bit)
    # and the LoRA branch are two nodes: forward adds their (M, N) outputs, and backward adds
    # their two (M, K) input gradients; on a CPU each of those bf16 adds of a freshly allocated
    # tensor costs as much as a small matmul. Here the input gradient of the LoRA branch is
    # accumulated into the base's by the second matmul itself (g @ W, then `addmm_`, beta=1), and
    # in fp32 so is the LoRA update into the base output. Training outputs are therefore within
    # one rounding of PEFT's, not bitwise; `_lora_forward` keeps PEFT's order without autograd
    # (evaluation, generation), where a user compares logits. The base weight is dequantized
    # again in backward, as bitsandbytes' own backward does.
    #
    # Note: the update summed in fp32. Under bf16 (or fp16) compute, an adapted projection
    # whose output feeds more than attention (o_proj, gate, up, down: `_fp32_sum`) returns
    # base(x) + update in fp32, not rounded to the compute dtype. Early in training the update
    # is ~1e-3 of the base output, below bf16's half-ulp (2^-9 relative), and rounding base +
    # update to bf16 (PEFT's sum of two bf16 tensors does too) keeps it only as noise. The
    # reference recipe never rounds that sum: `prepare_model_for_kbit_training` makes the norms
    # fp32, so every projection's input is fp32, bitsandbytes returns its input's dtype, and PEFT
    # adds the bf16 update to that fp32 output. Measured on the grid's `short` cell (bf16, r=8,
    # seed 42, both sides fed the same micro-batches: bench/engine_side.py, Note: shared batch
    # order), the step losses were:
    #   reference                          7.37 5.86 6.38 5.70 5.93 4.06
    #   ours, bf16 sums                    7.38 6.26 7.12 6.60 6.78 5.03  (as if updates were half lost)
    #   ours, fp32 sums (these)            7.39 5.85 6.36 5.71 5.91 4.04
    #   ours, fp32 sums for q, k, v too    7.38 5.76 6.23 5.55 5.78 3.91
    #   ours, fp32 compute                 7.34 5.64 6.11 5.45 5.68 3.83
    # Most of it is the MLP: gate and up in fp32, their product rounded once instead of four
    # times (SwiGLUMLP); the rest the residual stream, which o_proj's and down_proj's fp32
    # outputs turn fp32 from the first block on (`hidden + fp32` promotes). RMSNormFn normalizes
    # it into the 16-bit compute dtype, so every matmul still runs in bf16. q, k and v keep bf16
    # sums: attention rounds them to bf16 anyway, and fp32 ones cost ~4 % more time for a gain
    # beyond the reference's. Only what backward keeps is 16-bit (SwiGLUMLP's gate and up;
    # backward precision did not move the losses there), so activation memory grows only by the
    # fp32 residual: what each RMSNormFn keeps, and a checkpointed block's input. (Keeping
    # RMSNormFn's input in bf16 too saved those 2.3 KB per token per block on SmolLM2 but cost
    # eval loss: the `short` r=64 cell went from 0.5 % to 1.7 % off the reference.)
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, base_layer: torch.nn.Module,
                scaling: float, dtype: torch.dtype, fp32_sum: bool = True) -> torch.Tensor:  # fmt: skip
        out, xc, xa = _lora_linear(x, weight_a, weight_b, base_layer, scaling, dtype, fp32_sum)
        ctx.save_for_backward(xc, xa, weight_a, weight_b)
        ctx.base_layer, ctx.scaling, ctx.x_dtype = base_layer, scaling, x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc, xa, weight_a, weight_b = ctx.saved_tensors
        grads = _lora_linear_backward(ctx, grad_out, xc, xa, weight_a, weight_b, ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None)


def _lora_linear(x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, base_layer: torch.nn.Module,
                 scaling: float, dtype: torch.dtype, fp32_sum: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """LoraLinear's forward: (output, x in the compute dtype, x @ A^T).

    `fp32_sum`: under 16-bit compute, return base + update in fp32 (See Note: the update summed
    in fp32); else the update is accumulated into the base output in its own dtype.
    """
    out = base_layer(x)  # (..., N), in x's dtype; the bitsandbytes kernel, no autograd here
    xc = x.to(dtype)  # (..., K); no copy when x is already in the compute dtype
    xa = xc @ weight_a.to(dtype).t()  # (..., r)
    xa2 = xa.reshape(-1, xa.shape[-1])  # (M, r)
    if out.dtype == dtype and out.is_contiguous() and (dtype == torch.float32 or not fp32_sum):
        out.view(-1, out.shape[-1]).addmm_(xa2, _scaled(weight_b, scaling, dtype).t())  # one rounding
    elif fp32_sum:  # the update made in fp32 by the matmul that adds it (one (M, N) pass fewer)
        out = out.to(torch.float32)
        out.view(-1, out.shape[-1]).addmm_(xa2.to(torch.float32), _scaled(weight_b, scaling, torch.float32).t())
    else:
        out = out + (xa @ _scaled(weight_b, scaling, dtype).t()).to(out.dtype)
    return out, xc, xa


def _lora_linear_backward(ctx: Any, grad_out: torch.Tensor, xc: torch.Tensor, xa: torch.Tensor, weight_a: torch.Tensor,
                          weight_b: torch.Tensor, needs: tuple[bool, ...]) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """Gradients of LoraLinear (or LoraBranch, base_layer None) for (x, A, B).

    `ctx` carries base_layer, scaling and x_dtype.
    """
    dtype = xc.dtype
    g = grad_out.to(dtype).reshape(-1, grad_out.shape[-1])  # (M, N)
    xa2 = xa.reshape(-1, xa.shape[-1])  # (M, r)
    grad_xa = g @ _scaled(weight_b, ctx.scaling, dtype)  # (M, r)
    grad_b = ((g.t() @ xa2).to(torch.float32) * ctx.scaling).to(weight_b.dtype) if needs[2] else None  # (N, r)
    grad_a = (grad_xa.t() @ xc.reshape(-1, xc.shape[-1])).to(weight_a.dtype) if needs[1] else None  # (r, K)
    grad_x = None
    if needs[0]:
        if ctx.base_layer is None:
            grad_x = grad_xa @ weight_a.to(dtype)  # (M, K)
        else:
            grad_x = (g @ dense_weight(ctx.base_layer, dtype)).addmm_(grad_xa, weight_a.to(dtype))  # (M, K)
        grad_x = grad_x.reshape(xc.shape).to(ctx.x_dtype)  # (..., K)
    return grad_x, grad_a, grad_b


class SwiGLUMLP(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) with LoRA on all three projections, as one autograd node.

    # Note: the whole MLP as one node. Under 16-bit compute gate and up come out in fp32 (See
    # Note: the update summed in fp32), so as separate nodes their gradients would be fp32 too:
    # autograd casts SwiGLUDown's gradients of gate and up to fp32, and each LoraLinear casts
    # them back, two (M, I) round trips per block. Here gate's and up's backward take those
    # gradients in the compute dtype directly, and the two input gradients are summed in place.
    # What is kept is what LoraLinear x 2 and SwiGLUDown kept: the shared
    # input, gate and up in the compute dtype, and the three r-wide A outputs.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gate_a: torch.Tensor, gate_b: torch.Tensor, up_a: torch.Tensor,
                up_b: torch.Tensor, down_a: torch.Tensor, down_b: torch.Tensor, bases: tuple, scalings: tuple,
                dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        gate, xc, xa_gate = _lora_linear(x, gate_a, gate_b, bases[0], scalings[0], dtype)  # (..., I)
        up, _, xa_up = _lora_linear(x, up_a, up_b, bases[1], scalings[1], dtype)  # (..., I)
        kept_gate, kept_up = gate.to(dtype), up.to(dtype)  # what backward keeps
        if gate.dtype != dtype:  # fp32 sums: gate and up are this node's own temporaries, reused in place
            h = F.silu(gate, inplace=True).mul_(up).to(dtype)  # (..., I), rounded once: the down projection's input
        else:
            h = F.silu(gate) * up
        out, _, xa_down = _lora_linear(h, down_a, down_b, bases[2], scalings[2], dtype)  # (..., H)
        ctx.save_for_backward(xc, kept_gate, kept_up, xa_gate, xa_up, xa_down,
                              gate_a, gate_b, up_a, up_b, down_a, down_b)  # fmt: skip
        ctx.bases, ctx.scalings, ctx.x_dtype = bases, scalings, x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc, gate, up, xa_gate, xa_up, xa_down, gate_a, gate_b, up_a, up_b, down_a, down_b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        act = F.silu(gate)
        h = act * up  # (..., I), in the compute dtype
        need_h = needs[0] or any(needs[1:5])
        down = types.SimpleNamespace(base_layer=ctx.bases[2], scaling=ctx.scalings[2], x_dtype=h.dtype)
        grad_h, grad_down_a, grad_down_b = _lora_linear_backward(down, grad_out, h, xa_down, down_a, down_b,
                                                                 (need_h, needs[5], needs[6]))  # fmt: skip
        grads_gate_up: list[torch.Tensor | None] = [None] * 4
        grad_x = None
        if need_h:
            grad_up = grad_h * act  # (..., I)
            grad_gate = torch.ops.aten.silu_backward(grad_h * up, gate)  # (..., I)
            for k, (grad, xa, a, b) in enumerate(((grad_gate, xa_gate, gate_a, gate_b), (grad_up, xa_up, up_a, up_b))):
                proj = types.SimpleNamespace(base_layer=ctx.bases[k], scaling=ctx.scalings[k], x_dtype=xc.dtype)
                gx, grads_gate_up[2 * k], grads_gate_up[2 * k + 1] = _lora_linear_backward(
                    proj, grad, xc, xa, a, b, (needs[0], needs[1 + 2 * k], needs[2 + 2 * k]))
                grad_x = gx if grad_x is None else grad_x.add_(gx)
            if grad_x is not None:
                grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, *grads_gate_up, grad_down_a, grad_down_b, None, None, None


class SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up) with a LoRA down projection, keeping gate and up but not their product.

    # Note: the MLP product is recomputed. The (..., I) product is the down projection's input,
    # and its LoRA needs it in backward (grad_A = grad_xa^T @ h); LoraLinear would keep it, 1/6 of
    # a block's activations on SmolLM2. gate and up are kept anyway for silu's backward, so the
    # product is one elementwise op away: backward remakes it instead. The forward runs
    # SwiGLUFn's ops, then LoraLinear's.
    """

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                base_layer: torch.nn.Module, scaling: float, dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        h = F.silu(gate) * up  # (..., I)
        out, _, xa = _lora_linear(h, weight_a, weight_b, base_layer, scaling, dtype)
        # fp32 under 16-bit compute (See Note: the update summed in fp32); backward only needs them
        # at the compute dtype's precision, so that is what is kept.
        ctx.save_for_backward(gate.to(dtype), up.to(dtype), xa, weight_a, weight_b)
        ctx.base_layer, ctx.scaling, ctx.x_dtype, ctx.dtype = base_layer, scaling, h.dtype, dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up, xa, weight_a, weight_b = ctx.saved_tensors
        act = F.silu(gate)
        h = act * up  # bitwise the forward's product
        need_h = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h, grad_a, grad_b = _lora_linear_backward(ctx, grad_out, h.to(ctx.dtype), xa, weight_a, weight_b,
                                                       (need_h, *ctx.needs_input_grad[2:4]))  # fmt: skip
        grad_gate = grad_up = None
        if need_h:
            grad_up = grad_h * act
            grad_gate = torch.ops.aten.silu_backward(grad_h * up, gate)
        return grad_gate, grad_up, grad_a, grad_b, None, None, None


def dense_weight(layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A frozen linear layer's (N, K) weight in `dtype`: dequantized when it is bitsandbytes 4-bit."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.to(dtype)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight, quant_state).to(dtype)


def _scaled(weight_b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """scaling * B in the compute dtype.

    # Note: scaling folded into B. PEFT scales the (M, N) LoRA output; scaling the (N, r) matrix
    # instead saves a pass over that output in forward and over its gradient in backward. With a
    # power-of-two scaling (the QLoRA default alpha/r = 16/64) both are exact, so the result is
    # bitwise PEFT's; otherwise the two differ by one rounding.
    """
    return (weight_b * scaling).to(dtype)


class RMSNormFn(torch.autograd.Function):
    """Llama's RMSNorm, keeping the input in its own dtype and one fp32 rstd per row.

    Forward is Llama's op sequence; backward recomputes x_hat = x * rstd in fp32 and uses
    d_x = rstd * (d_xhat - x_hat * mean(d_xhat * x_hat)).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)  # (..., H)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.out_dtype = _norm_out_dtype(x, weight)
        xhat = (xf * rstd).to(ctx.out_dtype)
        ctx.save_for_backward(x, rstd, weight)
        if xhat.dtype == weight.dtype:  # xhat is a temporary: scaled in place
            return xhat.mul_(weight)
        return weight * xhat

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, rstd, weight = ctx.saved_tensors
        xhat = x.to(torch.float32) * rstd  # (..., H)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * xhat.to(ctx.out_dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad_out * weight).to(torch.float32)  # (..., H), as autograd of `weight * xhat` gives
            mean = (g * xhat).mean(-1, keepdim=True)  # (..., 1)
            grad_x = g.sub_(xhat.mul_(mean)).mul_(rstd).to(x.dtype)  # rstd * (g - xhat * mean), in place
        return grad_x, grad_weight, None


def _norm_out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """x's dtype, except that an fp32 residual stream is normalized into the 16-bit weights' dtype.

    (Llama's own `weight * x_hat.to(x.dtype)` would promote to fp32; the next matmul wants the
    compute dtype, See Note: the update summed in fp32.)
    """
    if x.dtype == torch.float32 and weight.dtype in (torch.bfloat16, torch.float16):
        return weight.dtype
    return x.dtype


class SwiGLUFn(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up only; silu(gate) is recomputed in backward."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        grad_up = grad_out * F.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)
        return grad_gate, grad_up


_training_arithmetic = 0  # > 0 inside `training_arithmetic()`


@contextlib.contextmanager
def training_arithmetic() -> Iterator[None]:
    """Compute without autograd exactly as training does (the fused nodes, fp32 sums).

    Without autograd the fused layers keep PEFT's order, so that evaluation and generation give
    the logits of the saved adapter; a pass that is compared with training's own outputs (DPO's
    reference log-probs of a fine-tuned model, which the policy's must equal before the first
    update) needs training's arithmetic instead (See Note: the update summed in fp32).
    """
    global _training_arithmetic
    _training_arithmetic += 1
    try:
        yield
    finally:
        _training_arithmetic -= 1


def _fused_wanted() -> bool:
    return torch.is_grad_enabled() or _training_arithmetic > 0


_real_tokens: tuple[torch.Tensor, int] | None = None  # set by `real_tokens`: (flat indices, B * T)


@contextlib.contextmanager
def real_tokens(index: torch.Tensor | None, n_slots: int) -> Iterator[None]:
    """Within it, the fused MLP of a (B, T, H) input with B * T == `n_slots` computes only `index`.

    # Note: padding-free MLP. A micro-batch pads its rows to the longest (the reference's too:
    # 19 % of the slots of bench/bench_grid.py's `gsm8k` batches, 6 % on a 96-example set with our
    # planner), and the MLP, three quarters of a Llama block's matmul work, would compute the pads
    # like any token. Pads sit at the end of their row, after every real token (qlora_core/data.py,
    # Note: packed attention), so no real token attends to one and no loss reads one: what the
    # MLP gives a pad changes nothing a user sees. Inside this context it gathers the real tokens
    # (`index`, into the flattened B * T positions), runs on them alone and writes zeros for the
    # pads; its gradients for real tokens and for the adapter are the same math. The context must
    # span the backward too: a checkpointed block runs its forward again there.
    """
    global _real_tokens
    previous = _real_tokens
    _real_tokens = None if index is None or index.numel() >= n_slots else (index, n_slots)
    try:
        yield
    finally:
        _real_tokens = previous


def _lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT LoRA `forward` (vanilla adapters): one `LoraLinear` node when training one adapter."""
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or not _lora_fusable(self):
        return self._unfused_forward(x, *args, **kwargs)
    self._check_forward_args(x, *args, **kwargs)
    name = _the_one_adapter(self)
    if _fused_wanted() and name is not None and not args and not kwargs:
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight  # (r, K), (N, r)
        return LoraLinear.apply(x, lora_a, lora_b, self.base_layer, self.scaling[name], matmul_dtype(x, lora_a.dtype),
                                getattr(self, "_fp32_sum", True))  # fmt: skip
    result = self.base_layer(x, *args, **kwargs)  # bitsandbytes keeps no activation for it
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight  # (r, K), (N, r)
        x_in = self.lora_dropout[name](x)
        out = LoraBranch.apply(x_in, lora_a, lora_b, self.scaling[name], matmul_dtype(x, lora_a.dtype))
        result = result + out.to(result.dtype)
    return result


def _single_plain_adapter(layer: Any) -> str | None:
    """The adapter name when `layer` is a patched LoRA layer with one vanilla, dropout-free adapter on.

    That is the state `LoraLinear` covers; anything else (no adapter, several, dropout, merged,
    disabled, DoRA, LoRA bias) takes PEFT's path or `LoraBranch`.
    """
    if not hasattr(layer, "_unfused_forward") or layer.disable_adapters or layer.merged or not _lora_fusable(layer):
        return None
    return _the_one_adapter(layer)


def _the_one_adapter(layer: Any) -> str | None:
    """`_single_plain_adapter` for a layer already known enabled, unmerged and vanilla."""
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or not isinstance(layer.lora_dropout[active[0]], torch.nn.Identity):
        return None
    return active[0]


def _lora_fusable(layer: Any) -> bool:
    """Vanilla LoRA on every active adapter: no DoRA/variants, no LoRA bias."""
    for name in layer.active_adapters:
        if name in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(name, False):
            return False
    return True


def _rmsnorm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFn.apply(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    projections = (self.gate_proj, self.up_proj, self.down_proj)
    names = {_single_plain_adapter(p) for p in projections} if _fused_wanted() else {None}
    if len(names) == 1 and None not in names:  # See Note: the whole MLP as one node
        (name,) = names
        weights = [w for p in projections for w in (p.lora_A[name].weight, p.lora_B[name].weight)]
        bases = tuple(p.base_layer for p in projections)
        scalings = tuple(p.scaling[name] for p in projections)
        dtype = matmul_dtype(x, weights[0].dtype)
        real = _real_tokens
        if real is not None and x.dim() == 3 and x.shape[0] * x.shape[1] == real[1]:  # See Note: padding-free MLP
            flat = x.reshape(real[1], x.shape[-1])
            out = SwiGLUMLP.apply(flat.index_select(0, real[0]), *weights, bases, scalings, dtype)  # (N_real, H)
            full = out.new_zeros(real[1], out.shape[-1]).index_copy(0, real[0], out)
            return full.view(*x.shape[:-1], out.shape[-1])
        return SwiGLUMLP.apply(x, *weights, bases, scalings, dtype)
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    name = _single_plain_adapter(down) if _fused_wanted() else None
    if name is not None:
        lora_a, lora_b = down.lora_A[name].weight, down.lora_B[name].weight  # (r, I), (H, r)
        return SwiGLUDown.apply(gate, up, lora_a, lora_b, down.base_layer, down.scaling[name], matmul_dtype(gate, lora_a.dtype))
    return down(SwiGLUFn.apply(gate, up))


def _is_silu(act: Any) -> bool:
    """torch's SiLU or transformers' `SiLUActivation` (ACT2FN["silu"], a bare `F.silu`)."""
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def apply_fused_layers(model: torch.nn.Module) -> dict[str, int]:
    """Give every LoRA linear, Llama-style RMSNorm and SwiGLU MLP of `model` the fused forward.

    Args:
        model: a model after `peft.get_peft_model` (LoRA layers are found by their
            `lora_A`/`lora_B`/`base_layer` attributes).

    The model's attention also switches from transformers' "sdpa" to `qlora_core.attention`'s,
    whose backward on the CPU under bf16 runs torch's fp32 kernel where that is the faster one
    (rows of at most 256 tokens; any length on AMX-BF16 CPUs: See Note: attention backward in
    fp32 on the CPU); its forward computes sdpa's numbers.

    Returns:
        How many modules of each kind were patched: {"lora": n, "rmsnorm": n, "swiglu": n,
        "attention": 1 if the model's attention was switched else 0}.
    """
    from qlora_core.attention import use_cpu_attention

    counts = {"lora": 0, "rmsnorm": 0, "swiglu": 0}
    for qualified, module in model.named_modules():
        kind = type(module).__name__
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "_check_forward_args"):
            if not hasattr(module, "_unfused_forward"):
                module._unfused_forward = module.forward
                module.forward = types.MethodType(_lora_forward, module)
            module._fp32_sum = qualified.rsplit(".", 1)[-1] not in _ATTENTION_INPUTS  # See Note: the update summed in fp32
            counts["lora"] += 1
        elif kind in _RMSNORM_CLASSES:
            module.forward = types.MethodType(_rmsnorm_forward, module)
            counts["rmsnorm"] += 1
        elif kind in _SWIGLU_CLASSES and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_swiglu_forward, module)
            counts["swiglu"] += 1
    counts["attention"] = int(use_cpu_attention(model))
    logger.info("fused layers: %s", counts)
    return counts
