"""qlora_core/fused.py: same outputs as the stock modules, same gradients, fewer saved activations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qlora_core.fused import LoraBranch, LoraLinear, RMSNormFn, SwiGLUDown, SwiGLUFn, SwiGLUMLP, apply_fused_layers
from qlora_core.models import add_lora, load_quantized_model

# bf16 gradients of the same math summed in another order differ by a few bf16 ulps.
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


def _grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("scaling", [0.25, 0.3])  # power of two: bitwise (See Note: scaling folded into B)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_branch_matches_autograd(dtype: torch.dtype, scaling: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g).to(dtype)  # (B, T, K)
    a, b = torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g)  # fp32 (r, K), (N, r)

    def stock(x, a, b):  # PEFT's order under autocast
        return (x @ a.to(dtype).t() @ b.to(dtype).t()) * scaling

    out_ref, grads_ref = _grads(stock, x, a, b)
    out, grads = _grads(lambda x, a, b: LoraBranch.apply(x, a, b, scaling, dtype), x, a, b)
    if scaling == 0.25:
        assert torch.equal(out, out_ref)
    else:  # one rounding apart: no further from the fp32 result than PEFT's order is
        exact = (x.double() @ a.double().t() @ b.double().t()) * scaling
        err, err_ref = (out.double() - exact).abs().max(), (out_ref.double() - exact).abs().max()
        assert err <= 2 * err_ref + 1e-6, (err, err_ref)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == want.dtype  # fp32 adapter gradients stay fp32
        # bf16 elements near zero can differ by one rounding of a much larger sum: scale atol.
        tol = GRAD_TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2 * float(want.abs().max()))
        torch.testing.assert_close(got, want, **tol)


def _adapted_layer(model_dir: Path, name: str = "q_proj") -> torch.nn.Module:
    """The first LoRA `name` projection of a 4-bit tiny Llama in training mode, with a non-zero B.

    (Training mode matters: in eval mode bitsandbytes repacks a CPU weight the first time it sees
    an input without grad, and computes slightly differently after; training keeps the layout.)
    """
    model = add_lora(load_quantized_model(model_dir, device="cpu"), 8, 16, 0.0,
                     gradient_checkpointing=False, fused_layers=True)  # fmt: skip
    model.train()
    layer = next(m for n, m in model.named_modules() if n.endswith(name) and hasattr(m, "_unfused_forward"))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(9))
    return layer


@pytest.mark.parametrize("autocast", [True, False])
def test_lora_linear_matches_peft_within_one_rounding(tiny_model_dir: Path, autocast: bool) -> None:
    """One node for base + LoRA: PEFT's output to one rounding of the sum (ours keeps the sum in
    fp32, See Note: the update summed in fp32), the same gradients."""
    layer = _adapted_layer(tiny_model_dir)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x0 = torch.randn(2, 5, a.shape[1], generator=torch.Generator().manual_seed(10)).to(layer.base_layer.compute_dtype)
    grad_out = None
    results = []
    for forward in (layer._unfused_forward,
                    lambda x: LoraLinear.apply(x, a, b, layer.base_layer, layer.scaling["default"], torch.bfloat16 if autocast else a.dtype)):  # fmt: skip
        a.grad = b.grad = None
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = forward(x)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(11)).to(out.dtype) if grad_out is None else grad_out
        out.backward(grad_out.to(out.dtype))
        results.append((out.detach(), x.grad, a.grad.clone(), b.grad.clone()))
    (out_ref, *grads_ref), (out, *grads) = results
    assert out_ref.dtype == torch.bfloat16 and out.dtype == torch.float32 and out.shape == out_ref.shape
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        update = out - layer.base_layer(x0).float()  # ours is made in fp32, PEFT's rounded to bf16
    # PEFT's sum is rounded to bf16 (an ulp of the output) and so are its B and its update (an
    # ulp of the update's scale, with the B-rounding of r terms that may cancel: 2 ulps)
    eps = torch.finfo(out_ref.dtype).eps
    bound = eps * out_ref.float().abs().clamp_min(1.0) + 2 * eps * float(update.abs().max())
    assert ((out - out_ref.float()).abs() <= bound).all()
    for got, want in zip(grads, grads_ref):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=3e-2, atol=2e-2 * float(want.abs().max()))


def test_lora_linear_keeps_a_small_update_under_bf16(tiny_model_dir: Path) -> None:
    """An update far below bf16's resolution of the output still reaches it, as the reference's
    fp32 sum lets it; a sum rounded to bf16 (PEFT's) keeps it only as noise."""
    layer = _adapted_layer(tiny_model_dir)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        b.mul_(1e-5)  # an early-training update: ~1e-4 of the base output, below bf16's 2^-9
    x = torch.randn(4, 16, a.shape[1], generator=torch.Generator().manual_seed(13)).to(torch.bfloat16)
    scaling = layer.scaling["default"]
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        base = layer.base_layer(x).float()
        xa = (x @ a.to(torch.bfloat16).t()).float()  # x A^T in bf16, then the update in fp32
    with torch.no_grad():
        update = xa @ (b * scaling).t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = LoraLinear.apply(x, a, b, layer.base_layer, scaling, torch.bfloat16).detach()
        peft = layer._unfused_forward(x).detach().float()
    assert float(update.abs().mean()) < 2**-9 * float(base.abs().mean())

    def kept(out: torch.Tensor) -> float:  # error of the update that reached the output, relative
        return float(((out - base) - update).norm() / update.norm())

    # base + update rounded to fp32: error ~ fp32 eps x |base| / |update| ~ 1e-7 x 500
    assert kept(ours) < 1e-3
    assert kept(peft) > 0.5


def test_swiglu_down_equals_the_two_nodes_it_replaces(tiny_model_dir: Path) -> None:
    """Not keeping silu(gate) * up changes nothing but memory: outputs and gradients are bitwise equal."""
    down = _adapted_layer(tiny_model_dir, "down_proj")
    a, b = down.lora_A["default"].weight, down.lora_B["default"].weight  # (r, I), (H, r)
    g = torch.Generator().manual_seed(12)
    gate, up = (torch.randn(2, 5, a.shape[1], generator=g).to(torch.bfloat16) for _ in range(2))

    def two_nodes(gate, up, a, b):
        return LoraLinear.apply(SwiGLUFn.apply(gate, up), a, b, down.base_layer, 0.5, torch.bfloat16)

    def one_node(gate, up, a, b):
        return SwiGLUDown.apply(gate, up, a, b, down.base_layer, 0.5, torch.bfloat16)

    out_ref, grads_ref = _grads(two_nodes, gate, up, a, b)
    out, grads = _grads(one_node, gate, up, a, b)
    assert torch.equal(out, out_ref)
    for got, want in zip(grads, grads_ref):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_mlp_equals_the_three_nodes_it_replaces(tiny_model_dir: Path, dtype: torch.dtype) -> None:
    """The MLP as one node: the same output bitwise, the same gradients to one rounding of bf16."""
    model = add_lora(load_quantized_model(tiny_model_dir, device="cpu"), 8, 16, 0.0,
                     gradient_checkpointing=False, fused_layers=True)  # fmt: skip
    model.train()
    mlp = next(m for m in model.modules() if type(m).__name__ == "LlamaMLP")
    projs = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    g = torch.Generator().manual_seed(14)
    with torch.no_grad():
        for p in projs:
            p.lora_B["default"].weight.normal_(generator=g)
    weights = [w for p in projs for w in (p.lora_A["default"].weight, p.lora_B["default"].weight)]
    bases, scalings = tuple(p.base_layer for p in projs), tuple(p.scaling["default"] for p in projs)
    x = torch.randn(2, 5, weights[0].shape[1], generator=g).to(dtype)

    def three_nodes(x, *w):
        gate = LoraLinear.apply(x, w[0], w[1], bases[0], scalings[0], dtype)
        up = LoraLinear.apply(x, w[2], w[3], bases[1], scalings[1], dtype)
        return SwiGLUDown.apply(gate, up, w[4], w[5], bases[2], scalings[2], dtype)

    def one_node(x, *w):
        return SwiGLUMLP.apply(x, *w, bases, scalings, dtype)

    out_ref, grads_ref = _grads(three_nodes, x, *weights)
    out, grads = _grads(one_node, x, *weights)
    assert torch.equal(out, out_ref)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == want.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        else:  # gate's and up's gradients rounded to bf16 once here, after an fp32 detour there
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_lora_linear_keeps_peft_numerics_without_autograd(tiny_model_dir: Path) -> None:
    """Evaluation and generation give bitwise the logits a user gets from the saved adapter."""
    layer = _adapted_layer(tiny_model_dir)
    x = torch.randn(2, 5, layer.lora_A["default"].weight.shape[1]).to(layer.base_layer.compute_dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), layer._unfused_forward(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_llama(dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(16, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1)).to(dtype) * 3
    out_ref, grads_ref = _grads(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), x, norm.weight)
    out, grads = _grads(lambda x, w: RMSNormFn.apply(x, w, norm.variance_epsilon), x, norm.weight)
    assert torch.equal(out, out_ref)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_autograd(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    gate, up = torch.randn(4, 32, generator=g).to(dtype) * 4, torch.randn(4, 32, generator=g).to(dtype)
    out_ref, grads_ref = _grads(lambda a, b: torch.nn.functional.silu(a) * b, gate, up)
    out, grads = _grads(SwiGLUFn.apply, gate, up)
    assert torch.equal(out, out_ref)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # same kernels, same order


def _loss_and_grads(model_dir: Path, fused: bool, autocast: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = add_lora(load_quantized_model(model_dir, device="cpu"), 8, 16, 0.0,
                     gradient_checkpointing=False, fused_layers=fused)  # fmt: skip
    model.train()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # a trained adapter (B starts at zero, which would make the sums trivial)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=g)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("autocast", [True, False])
def test_fused_model_gives_the_same_logits_and_gradients(tiny_model_dir: Path, autocast: bool) -> None:
    """A user notices nothing but memory: logits, loss and adapter gradients agree to bf16 rounding.

    (Each adapted projection keeps base + LoRA in fp32 where PEFT rounds it to bf16, so a trained
    adapter's logits are not bitwise PEFT's in training; see test_lora_linear_* for one layer.)
    """
    logits_ref, loss_ref, grads_ref = _loss_and_grads(tiny_model_dir, fused=False, autocast=autocast)
    logits, loss, grads = _loss_and_grads(tiny_model_dir, fused=True, autocast=autocast)
    torch.testing.assert_close(logits, logits_ref, rtol=2e-2, atol=2e-2)  # the base is bf16 either way
    torch.testing.assert_close(loss, loss_ref, rtol=1e-2, atol=0)
    assert len(grads) == len(grads_ref) == 2 * 7 * 2
    for got, want in zip(grads, grads_ref):
        assert got.dtype == torch.float32
        # the activations are bf16 either way: ~1 % apart in norm (bf16's eps is 0.8 %), measured
        assert float((got - want).norm() / want.norm()) < 3e-2


def test_fused_model_follows_a_small_update_closer_to_fp32(tiny_model_dir: Path) -> None:
    """Under bf16 compute, how the logits move with an early-training update (B ~ 1e-3) is
    closer to what fp32 compute gives with the fused layers than with PEFT's bf16 sums."""
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(3))

    def logit_change(fused: bool, dtype: str) -> torch.Tensor:
        torch.manual_seed(0)
        model = add_lora(load_quantized_model(tiny_model_dir, device="cpu", compute_dtype=dtype), 8, 16, 0.0,
                         gradient_checkpointing=False, fused_layers=fused)  # fmt: skip
        model.train()
        logits = []
        for std in (0.0, 1e-3):
            g = torch.Generator().manual_seed(6)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * std)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                logits.append(model(input_ids=ids, use_cache=False).logits.detach().float())
        return logits[1] - logits[0]

    exact = logit_change(True, "float32")
    err = {fused: float((logit_change(fused, "bfloat16") - exact).norm() / exact.norm()) for fused in (True, False)}
    assert err[True] < 0.85 * err[False], err  # measured: 0.20 against 0.28


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, use_cache=False)
    return sum(seen.values())


def test_fused_layers_keep_fewer_activations(tiny_model_dir: Path) -> None:
    ids = torch.randint(3, 300, (4, 64), generator=torch.Generator().manual_seed(4))
    saved = {}
    for fused in (False, True):
        model = add_lora(load_quantized_model(tiny_model_dir, device="cpu"), 8, 16, 0.0,
                         gradient_checkpointing=False, fused_layers=fused)  # fmt: skip
        model.train()
        saved[fused] = _saved_bytes(model, ids)
    assert saved[True] < 0.75 * saved[False], saved


def test_unfusable_states_fall_back_to_peft(tiny_model_dir: Path) -> None:
    """Disabled adapters (how PEFT computes the base model's output) still skip the adapters."""
    model = add_lora(load_quantized_model(tiny_model_dir, device="cpu"), 8, 16, 0.0,
                     gradient_checkpointing=False, fused_layers=True)  # fmt: skip
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # make the adapters change the output
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert not torch.allclose(tuned, base)
    counts = apply_fused_layers(model)  # idempotent: a second call wraps nothing twice
    assert counts["lora"] == 2 * 7
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tuned)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_mlp_skips_pads_and_training_sees_the_same_loss_and_gradients(
        tiny_model_dir: Path, checkpointing: bool, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """See Note: padding-free MLP. A padded micro-batch gives the loss and adapter gradients it
    gives with the pads computed (fp32: to float rounding), while the MLP sees only real tokens,
    also when a checkpointed block runs its forward again in backward."""
    from qlora_core import data, fused
    from qlora_core.loss import causal_lm_loss

    g = torch.Generator().manual_seed(5)
    examples = []
    for n in (30, 9, 17):
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        examples.append(data.TokenizedExample(ids, [-100] * (n // 3) + ids[n // 3:]))
    rows = [[0], [1, 2], [2]]  # lengths 30, 26, 17: 17 of 90 slots padded
    batch = data.collate(examples, rows, pad_token_id=0)
    index, n_slots = data.real_token_index(examples, rows)
    assert (n_slots, index.numel()) == (90, 73)
    assert bool((batch["labels"].flatten()[torch.tensor(sorted(set(range(90)) - set(index.tolist())))] == -100).all())

    seen_rows: list[int] = []
    forward = SwiGLUMLP.forward

    def counting(ctx, x, *args):  # type: ignore[no-untyped-def]
        seen_rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return forward(ctx, x, *args)

    monkeypatch.setattr(SwiGLUMLP, "forward", staticmethod(counting))

    def run(padding_free: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = add_lora(load_quantized_model(tiny_model_dir, device="cpu", compute_dtype="float32"), 8, 16, 0.0,
                         gradient_checkpointing=checkpointing, fused_layers=True)  # fmt: skip
        model.train()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05, generator=torch.Generator().manual_seed(6))
        with fused.real_tokens(index if padding_free else None, n_slots):
            loss = causal_lm_loss(model, batch).loss_sum
            loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    loss_ref, grads_ref = run(False)
    assert seen_rows and set(seen_rows) == {90}
    seen_rows.clear()
    loss, grads = run(True)
    assert seen_rows and set(seen_rows) == {73}  # every MLP call, the recomputed ones included
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    for got, want in zip(grads, grads_ref):
        assert float((got - want).norm() / want.norm()) < 1e-4
