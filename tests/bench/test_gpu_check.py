"""bench/gpu_check.py's parts that need no GPU: arguments, the 7B-shaped model builder, the data,
the table, and the whole pipeline at test size on the CPU (so the script a GPU machine runs has run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.common import IGNORE_INDEX, tokenize_chat
from bench.gpu_check import build_parser, format_table, long_chats
from qlora_core.testing import build_llama_shape_dir, build_tiny_tokenizer, count_parameters, llama_shape_config

REPO = Path(__file__).resolve().parents[2]
LLAMA2_7B_PARAMETERS = 6_738_415_616  # Llama-2-7B's published count


def test_defaults_are_the_issue_s_check():
    args = build_parser().parse_args([])
    assert (args.steps, args.seq_len, args.shape, args.lora_r, args.device) == (20, 2048, "7b", 64, "cuda")
    args = build_parser().parse_args(["--steps", "3", "--seq-len", "512", "--device", "cpu", "--skip-reference"])
    assert (args.steps, args.seq_len, args.device, args.skip_reference) == (3, 512, "cpu", True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--device", "tpu"])


def test_the_7b_shape_is_llama_2_7b_on_the_meta_device():
    assert count_parameters(llama_shape_config("7b")) == LLAMA2_7B_PARAMETERS
    with pytest.raises(ValueError, match="shape must be one of"):
        llama_shape_config("70b")


def test_builder_writes_a_sharded_model_that_loads_in_4bit(tmp_path):
    from qlora_core.models import load_quantized_model

    out = build_llama_shape_dir(tmp_path / "m", "tiny", seed=3, shard_bytes=200_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    model = load_quantized_model(out, compute_dtype="float32", device="cpu")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    again = build_llama_shape_dir(tmp_path / "m2", "tiny", seed=3, shard_bytes=200_000)
    from safetensors.torch import load_file

    assert all(torch.equal(load_file(str(a))[k], load_file(str(b))[k])  # same seed, same weights
               for a, b in zip(shards, sorted(again.glob("model-*.safetensors"))) for k in load_file(str(a)))


def test_long_chats_fill_the_sequence_and_keep_a_supervised_tail():
    tok = build_tiny_tokenizer()
    chats = long_chats(3, tok, 512)
    assert len(chats) == 3
    for chat in chats:
        ids, labels = tokenize_chat(tok, chat["messages"], 512)
        assert len(ids) == 512
        assert sum(1 for t in labels if t != IGNORE_INDEX) > 256


def test_table_has_every_row():
    table = format_table([("device", "cpu"), ("a much longer check name", "ok")])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| device ") and lines[3].endswith("| ok |")


def test_without_a_gpu_it_says_so_and_exits_2():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def test_every_cuda_marked_test_is_where_the_gpu_check_collects():
    """The check collects tests/cuda alone (so a GPU machine needs no service packages): a CUDA test
    anywhere else would silently never run on a GPU."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests"], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert ids, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert all(i.startswith("tests/cuda/") for i in ids), ids


@pytest.mark.slow
def test_the_whole_pipeline_runs_at_test_size_on_the_cpu():
    proc = subprocess.run(["bench/gpu_check.sh", "--device", "cpu", "--shape", "tiny", "--steps", "2",
                           "--seq-len", "256", "--skip-tests"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    figures = dict(kv.split("=") for kv in last.split())
    assert float(figures["engine_tokens_per_s"]) > 0 and float(figures["reference_tokens_per_s"]) > 0
    assert "ours (defaults)" in proc.stdout and "reference recipe" in proc.stdout
