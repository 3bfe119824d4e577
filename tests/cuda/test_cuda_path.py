"""The engine's CUDA path on a real GPU: bitsandbytes' CUDA kernels, paged optimizer state, CUDA RNG.

Every test here needs a CUDA device and is skipped without one (this project's CI machines have
none); `bench/gpu_check.sh` runs them on a GPU machine (`pytest -m cuda`). Nothing is faked: where
a GPU exists these run the same code a GPU worker runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs these)"),
]


def _loss_and_grads(model_dir: Path, fused: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    from qlora_core.device import native_dtype
    from qlora_core.models import add_lora, load_quantized_model

    dtype = native_dtype("cuda").dtype
    torch.manual_seed(0)
    model = add_lora(load_quantized_model(model_dir, compute_dtype=dtype, device="cuda"), 8, 16, 0.0,
                     gradient_checkpointing=False, fused_layers=fused)  # fmt: skip
    model.train()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # a trained-looking adapter (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.autocast("cuda", dtype=getattr(torch, dtype)):
        out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.logits.detach().float().cpu(), out.loss.detach().cpu(), [p.grad.cpu() for p in model.parameters()
                                                                         if p.requires_grad]  # fmt: skip


def test_fused_layers_on_cuda_kernels_match_peft(tiny_model_dir: Path) -> None:
    """The fused LoRA/RMSNorm/SwiGLU autograd on bitsandbytes' CUDA 4-bit kernels against PEFT's
    and transformers' own modules: the same logits, loss and adapter gradients to 16-bit rounding."""
    logits_ref, loss_ref, grads_ref = _loss_and_grads(tiny_model_dir, fused=False)
    logits, loss, grads = _loss_and_grads(tiny_model_dir, fused=True)
    torch.testing.assert_close(logits, logits_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-2, atol=0)
    assert len(grads) == len(grads_ref) == 2 * 7 * 2
    for got, want in zip(grads, grads_ref):
        assert float((got - want).norm() / want.norm()) < 5e-2


def test_paged_optimizer_state_is_paged_and_stays_paged_after_a_resume() -> None:
    """paged_adamw_32bit keeps its state in paged (cudaMallocManaged) memory, also once loaded back."""
    from qlora_core.optim import build_optimizer, load_optimizer_state

    messages: list[tuple[str, str]] = []
    p = torch.nn.Parameter(torch.randn(512, 512, device="cuda"))  # >= 1e5 elements: bitsandbytes pages it
    opt = build_optimizer([p], "paged_adamw_32bit", 1e-3, 0.0, p.device, lambda lvl, m: messages.append((lvl, m)))
    assert type(opt).__name__ == "PagedAdamW32bit" and not messages
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    torch.cuda.synchronize()
    state = opt.state[p]
    assert state["state1"].is_paged and state["state2"].is_paged
    saved = {k: v for k, v in opt.state_dict().items()}
    saved = torch.utils._pytree.tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, saved)

    q = torch.nn.Parameter(p.detach().clone())
    resumed = build_optimizer([q], "paged_adamw_32bit", 1e-3, 0.0, q.device)
    moved = load_optimizer_state(resumed, saved)
    assert moved == 2
    assert resumed.state[q]["state1"].is_paged and resumed.state[q]["state2"].is_paged
    torch.testing.assert_close(resumed.state[q]["state1"], state["state1"], rtol=0, atol=0)
    g = torch.randn_like(p)
    p.grad, q.grad = g, g.clone()
    opt.step()
    resumed.step()
    torch.testing.assert_close(q, p, rtol=0, atol=0)  # the resumed optimizer steps exactly as the original


def test_exact_resume_with_the_cuda_rng(tiny_model_dir: Path, tmp_path: Path) -> None:
    """LoRA dropout draws from the CUDA RNG: a run stopped at step 2 and resumed ends where an
    uninterrupted one does (to one rounding of the compute dtype: CUDA attention backward may
    accumulate in a different order from run to run)."""
    import json

    from safetensors.torch import load_file

    from qlora_core.checkpoint import latest_checkpoint, read_state
    from qlora_core.config import TrainConfig
    from qlora_core.train import TrainingCallback, train

    rows = [{"messages": [{"role": "user", "content": f"Add {a} and {b}."},
                          {"role": "assistant", "content": f"The answer is {a + b}."}]}
            for a in range(1, 5) for b in range(1, 5)]  # fmt: skip
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig(lora_r=8, lora_alpha=16, lora_dropout=0.1, learning_rate=5e-3, batch_size=4,
                         gradient_accumulation_steps=1, max_seq_length=64, warmup_ratio=0.0, checkpoint_steps=1,
                         seed=11)  # fmt: skip

    class StopAt2(TrainingCallback):
        def should_stop(self, step: int) -> bool:
            return step >= 2

    reference = train(tiny_model_dir, data, tmp_path / "a", config)
    train(tiny_model_dir, data, tmp_path / "b", config, callback=StopAt2())
    assert "cuda" in read_state(latest_checkpoint(tmp_path / "b"))["rng"]  # the CUDA RNG state is in the checkpoint
    resumed = train(tiny_model_dir, data, tmp_path / "b", config)
    assert resumed.steps == reference.steps
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    eps = torch.finfo(torch.bfloat16).eps
    for key in a:
        assert float((b[key] - a[key]).norm() / a[key].norm()) <= 4 * eps, key
