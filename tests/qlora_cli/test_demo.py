"""qlora_cli/demo.py: the demo's work is sized to the machine it runs on (See Note: the demo sized to the machine)."""

from __future__ import annotations

import pytest
import torch

from qlora_cli import demo


@pytest.mark.parametrize("gflops,expected", [
    (969.0, 23),  # an idle AVX512-BF16 EPYC, bf16
    (380.0, 17),  # the same kind on a busier day
    (142.0, 10),  # an AVX2-only EPYC, fp32, measured by the demo's probe
    (120.0, 9),   # a slower AVX2-only EPYC (2026-11-30): 8.5-9.8 s a step, ~165 s for the whole demo
    (41.0, 8),    # an AVX2-only EPYC, fp32 (REFERENCES.md): the floor
])  # fmt: skip
def test_steps_follow_the_measured_matmul_speed(monkeypatch, gflops, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(demo, "matmul_gflops", lambda min_s=0.3: (gflops, "float32"))
    steps, why = demo.sized_steps()
    assert steps == expected and f"{gflops:.0f} GFLOP/s" in why


def test_the_probe_measures_this_cpu():
    gflops, dtype = demo.matmul_gflops(min_s=0.05)
    assert gflops > 0.1 and dtype in ("bfloat16", "float32")
