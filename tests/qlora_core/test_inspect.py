"""Tests for qlora_core.inspect: the `qlora models inspect` report."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_core.inspect import format_report, inspect_model
from qlora_core.quant import bits_per_param


def _lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith(" "))


def test_report_on_tiny_model(tiny_model_dir: Path) -> None:
    report = inspect_model(tiny_model_dir, double_quant=True, quant_type="nf4", seq_len=128, batch_size=2,
                           lora_r=8, gradient_checkpointing=True)  # fmt: skip
    assert report["n_quantized_params"] == 2 * (4 * 64 * 64 + 3 * 64 * 128)
    assert report["n_parameters"] > report["n_quantized_params"]
    assert report["base_4bit_bytes"] > report["n_quantized_params"] // 2
    text = format_report("tiny", report)
    fields = _lines(text)
    assert fields["bits_per_param"] == f"{report['bits_per_param']:.3f}"
    assert fields["bits_per_param_formula"] == "4.127"
    assert int(fields["estimated_training_bytes"].split()[0]) == report["memory"]["total_bytes"]


def test_bad_model_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        inspect_model(tmp_path, True, "nf4", 128, 1, 8, True)


@pytest.mark.slow
@pytest.mark.parametrize(("double_quant", "expected"), [(True, "4.127"), (False, "4.500")])
def test_bundled_smollm2_report(bundled_model_dir: Path, double_quant: bool, expected: str) -> None:
    report = inspect_model(bundled_model_dir, double_quant=double_quant, quant_type="nf4", seq_len=1024,
                           batch_size=1, lora_r=64, gradient_checkpointing=True)  # fmt: skip
    text = format_report("HuggingFaceTB/SmolLM2-135M-Instruct", report)
    assert f"bits_per_param={expected}" in text.splitlines()
    assert report["n_parameters"] == 134_515_008 and report["n_quantized_layers"] == 30 * 7
    # measured bytes agree with the formula to within the per-layer offsets
    assert report["bits_per_param"] == pytest.approx(bits_per_param(double_quant), abs=1e-3)
