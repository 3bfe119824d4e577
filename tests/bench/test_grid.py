"""bench/bench_grid.py's data and command lines: the shapes are what the README says they are."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from bench.bench_grid import SHAPES, fastest_run, shape_data, side_argv
from bench.common import ChildResult, tokenize_chat


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


def test_a_cell_reports_its_fastest_run_and_scores_the_first_adapter():
    runs = [ChildResult("engine", {"train_s": 30.0, "adapter_dir": "run0/adapter"}, 1500.0, 40.0),
            ChildResult("engine", {"train_s": 24.0, "adapter_dir": "run1/adapter"}, 1400.0, 33.0)]
    best = fastest_run(runs)
    assert best.result["train_s"] == 24.0 and best.wall_s == 33.0
    assert best.result["adapter_dir"] == "run0/adapter"  # every run trains the same adapter; the first is scored
    assert runs[1].result["adapter_dir"] == "run1/adapter"  # the runs themselves are left as they were


def test_the_reference_s_batch_order_reaches_both_sides(tmp_path):
    shape = SHAPES["short"]
    order = tmp_path / "order.json"
    for side in ("reference", "engine"):
        argv = side_argv(side, shape, 8, None, tmp_path, tmp_path / "t.jsonl", tmp_path / side, 42, order_file=order)
        assert argv[argv.index("--batch-order") + 1] == str(order)  # the reference writes it, ours reads it
    assert "--batch-order" not in side_argv("engine", shape, 8, None, tmp_path, tmp_path / "t.jsonl", tmp_path / "o", 42)


def test_our_side_trains_on_the_recorded_micro_batches(tmp_path, monkeypatch):
    """See Note: shared batch order: ours takes the reference's micro-batches, epoch by epoch, in order."""
    import json

    from bench.engine_side import _replay_batch_order
    from qlora_core import data
    from qlora_core.config import TrainConfig
    from qlora_core.plan import make_plan

    monkeypatch.setattr(data, "plan_batches", data.plan_batches)  # undone after the test
    recorded = [[3, 0], [4, 1], [2], [1, 2], [0, 4], [3]]  # 5 examples, batch 2, two epochs
    (tmp_path / "order.json").write_text(json.dumps(recorded))
    _replay_batch_order(tmp_path / "order.json", batch_size=2)
    config = TrainConfig(batch_size=2, gradient_accumulation_steps=2, n_epochs=2, max_seq_length=64)
    plan = make_plan([10, 20, 30, 40, 50], config, has_valid=False)
    assert plan.epoch_batches == [[[[i] for i in b] for b in recorded[:3]], [[[i] for i in b] for b in recorded[3:]]]
    assert plan.total_steps == 4
    # anything that is not the recorded run (another set, packing) keeps the engine's own planner
    other = make_plan([10, 20, 30], config, has_valid=False)
    assert sorted(i for b in other.epoch_batches[0] for row in b for i in row) == [0, 1, 2]


def test_the_scorer_gives_one_adapter_one_loss_wherever_it_comes(bundled_model_dir: Path, tmp_path):
    """See bench/common.py, Note: a fresh base per adapter (PEFT's unload() moved the 4-bit base)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from bench.common import evaluate_adapters, load_reference_base

    torch.manual_seed(0)
    model = get_peft_model(load_reference_base(bundled_model_dir, "bfloat16"), LoraConfig(r=4, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)  # a trained-looking adapter: B = 0 would change nothing
    model.save_pretrained(tmp_path / "adapter")
    chats = [{"messages": [{"role": "user", "content": f"What is {a} + {a}?"},
                           {"role": "assistant", "content": f"The answer is {2 * a}."}]} for a in range(4)]  # fmt: skip
    adapter = tmp_path / "adapter"
    losses = evaluate_adapters(bundled_model_dir, {"first": adapter, "second": adapter, "third": adapter}, chats, 64)
    assert losses["first"] == losses["second"] == losses["third"] != losses["base"]
