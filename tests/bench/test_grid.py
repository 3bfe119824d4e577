"""bench/bench_grid.py's data and command lines: the shapes are what the README says they are."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from bench.bench_grid import SHAPES, shape_data, side_argv
from bench.common import tokenize_chat


@pytest.fixture(scope="module")
def tokenizer(bundled_model_dir: Path):
    from qlora_core.models import load_tokenizer

    return load_tokenizer(bundled_model_dir)


@pytest.mark.parametrize("name,low,high", [("short", 35, 70), ("gsm8k", 150, 300), ("long", 600, 1100)])
def test_shapes_have_their_lengths_and_hold_out_their_eval(tokenizer, name, low, high):
    shape = SHAPES[name]
    train, held = shape_data(shape)
    assert (len(train), len(held)) == (shape.n_train, shape.n_eval)
    lengths = [len(tokenize_chat(tokenizer, c["messages"], 1 << 20)[0]) for c in train]
    assert low <= statistics.mean(lengths) <= high
    assert not {str(c) for c in train} & {str(c) for c in held}


def test_each_side_gets_the_same_work_and_its_own_dtype(tmp_path):
    shape = SHAPES["gsm8k"]
    ref = side_argv("reference", shape, 8, None, tmp_path, tmp_path / "t.jsonl", tmp_path / "r", 42)
    ours = side_argv("engine", shape, 8, None, tmp_path, tmp_path / "t.jsonl", tmp_path / "o", 42)
    shared = ["--batch-size", "4", "--grad-accum", "2", "--max-len", "512", "--seed", "42"]
    for argv in (ref, ours):
        assert " ".join(shared) in " ".join(argv)
    assert "--dtype" not in ref and not any(a.startswith("compute_dtype") for a in ours)  # own defaults
    assert ref[ref.index("--steps") + 1] == "4" and ref[ref.index("--lora-r") + 1] == "8"
    assert "lora_r=8" in ours
    ref32 = side_argv("reference", shape, 64, "float32", tmp_path, tmp_path / "t.jsonl", tmp_path / "r", 42)
    ours32 = side_argv("engine", shape, 64, "float32", tmp_path, tmp_path / "t.jsonl", tmp_path / "o", 42)
    assert ref32[ref32.index("--dtype") + 1] == "float32" and "compute_dtype=float32" in ours32


def test_ours_set_reaches_only_our_side(tmp_path):
    shape = SHAPES["short"]
    ref = side_argv("reference", shape, 8, "float32", tmp_path, tmp_path / "t.jsonl", tmp_path / "r", 42,
                    ["checkpoint_fraction=0"])
    ours = side_argv("engine", shape, 8, "float32", tmp_path, tmp_path / "t.jsonl", tmp_path / "o", 42,
                     ["checkpoint_fraction=0"])
    assert "checkpoint_fraction=0" in ours and ours[ours.index("checkpoint_fraction=0") - 1] == "--set"
    assert not any("checkpoint_fraction" in a for a in ref)
