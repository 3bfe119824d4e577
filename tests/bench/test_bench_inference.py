"""bench/bench_inference.py's parts that need no server: arguments, the adapters it builds, the anchor's
loop and its statistics, at the tiny random Llama's size (the full bench runs with `make bench`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.bench_inference import (BUNDLED_MODEL_ID, REPO_ROOT, build_adapters, build_parser, percentile,
                                   proc_memory_mb, run_anchor)

LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_defaults_are_the_issue_s_settings():
    args = build_parser().parse_args([])
    assert (args.max_tokens, args.adapters, args.model_id) == (64, 8, BUNDLED_MODEL_ID)
    assert args.data_dir == REPO_ROOT / ".data" and not args.skip_anchor
    args = build_parser().parse_args(["--max-tokens", "8", "--rounds", "1", "--adapters", "2", "--skip-anchor"])
    assert (args.max_tokens, args.rounds, args.adapters, args.skip_anchor) == (8, 1, 2, True)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return build_adapters(tiny_model_dir, tmp_path_factory.mktemp("adapters"), 2, r=4, alpha=8.0)


def test_adapters_are_distinct_peft_adapters_on_every_linear(adapters: list[Path]):
    configs = [json.loads((a / "adapter_config.json").read_text()) for a in adapters]
    for config in configs:
        targets = {m.rsplit(".", 1)[-1] for m in config["target_modules"]}  # saved as full module names
        assert (config["r"], config["lora_alpha"], targets) == (4, 8.0, LLAMA_LINEARS)
    weights = [load_file(a / "adapter_model.safetensors") for a in adapters]
    assert weights[0].keys() == weights[1].keys()
    b_keys = [k for k in weights[0] if "lora_B" in k]
    assert len(b_keys) == 2 * len(LLAMA_LINEARS)  # two layers
    for k in b_keys:
        assert weights[0][k].abs().max() > 0  # B non-zero: the adapter changes the output
        assert not torch.equal(weights[0][k], weights[1][k])


def test_the_anchor_loads_each_adapter_and_generates(tiny_model_dir: Path, adapters: list[Path]):
    result = run_anchor(tiny_model_dir, adapters, max_tokens=4, dtype="float32")
    assert len(result["tokens"]) == len(result["texts"]) == len(result["adapter_load_s"]) == 2
    assert all(1 <= t <= 4 for t in result["tokens"])
    assert result["total_s"] >= sum(result["generate_s"]) > 0


def test_percentile_interpolates_like_numpy():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 99) == pytest.approx(4.96)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_memory_is_read_from_proc():
    mem = proc_memory_mb(os.getpid())
    assert 0 < mem["VmRSS"] <= mem["VmHWM"]
