"""bench/bench_attention.py: both sides of the kernel comparison compute the same attention gradients,
and a CPU without native bf16 gets a figures line without an emulated run."""

from __future__ import annotations

import pytest
import torch

import bench.bench_attention as bench
from qlora_core.attention import causal_backward_fp32


def test_the_two_kernels_timed_give_the_same_gradients_to_bf16_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 30, heads, 64, generator=g).to(torch.bfloat16).transpose(1, 2) for heads in (9, 3, 3))
    grad = torch.randn(2, 30, 9, 64, generator=g).to(torch.bfloat16).transpose(1, 2)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    bf16 = backward(grad, q, k, v, out, lse, 0.0, True)
    fp32 = causal_backward_fp32(grad, q, k, v, out, lse)
    for a, b in zip(bf16, fp32):
        assert b.dtype == torch.bfloat16 and float((a.float() - b.float()).norm() / b.float().norm()) < 1e-2
    assert set(bench.kernel(2, 30, rounds=1)) == {"sdpa", "ours"}


def test_without_native_bf16_it_reports_nothing_measured(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from qlora_core import device

    monkeypatch.setattr(device, "native_dtype", lambda _="cpu": device.DtypeChoice("float32", "test", False))
    assert bench.main([]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "attention_bwd_speedup=n/a step_speedup=n/a"
