"""Tests for qlora_core.data: label masks per format, overlong handling, batch plans, packing.

The packing test is the one that matters most: a packed batch must give the same loss as its
examples run one per row, on a real (tiny, random) Llama, with the attention implementations a
CPU run uses. Its twin shows the same check fails when positions do not restart, so it can fail.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from qlora_core.data import (
    IGNORE_INDEX,
    TokenizedExample,
    batch_stats,
    collate,
    plan_batches,
    tokenize_example,
    tokenize_file,
)
from qlora_core.testing import build_tiny_tokenizer

EOT = "<|im_end|>"
CHAT = {"messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello"},
    {"role": "assistant", "content": "hello"},  # also appears inside the user turn above
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris.", "weight": 0},
    {"role": "user", "content": "Add 3 and 4."},
    {"role": "assistant", "content": "Add 3 and 4 to get 7."},
]}


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def supervised_segments(tok, ex: TokenizedExample) -> list[str]:
    """Decode each maximal run of supervised tokens."""
    runs, cur = [], []
    for i, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE_INDEX:
            assert label == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_chat_supervises_each_trained_reply_and_its_end_token(tok) -> None:
    ex, truncated = tokenize_example(tok, CHAT, 1024, train_on_inputs=False)
    assert not truncated
    msgs = [{"role": m["role"], "content": m["content"]} for m in CHAT["messages"]]
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    # The weight-0 reply about Paris is not supervised; "hello" is the reply, not the user's.
    assert supervised_segments(tok, ex) == ["hello" + EOT, "Add 3 and 4 to get 7." + EOT]


def test_train_on_inputs_supervises_all_but_weight_zero_and_first_token(tok) -> None:
    ex, _ = tokenize_example(tok, CHAT, 1024, train_on_inputs=True)
    text = tok.decode(ex.input_ids)
    paris = "The capital of France is Paris." + EOT
    before, after = text.split(paris)
    segments = supervised_segments(tok, ex)
    assert len(segments) == 2
    assert before.endswith(segments[0]) and len(before) - len(segments[0]) <= len("<|im_start|>")
    assert segments[1] == after
    assert ex.labels[0] == IGNORE_INDEX


@pytest.mark.parametrize("example,prompt,completion", [
    ({"prompt": "2+2=", "completion": "The answer is 4."}, "2+2=", "The answer is 4."),
    ({"instruction": "Add the numbers.", "input": "3 4", "output": "7"}, "Add the numbers.\n\n3 4", "7"),
    ({"instruction": "Count to three.", "output": "One, two, three."}, "Count to three.", "One, two, three."),
])
def test_prompt_completion_and_alpaca_become_a_chat(tok, example: dict, prompt: str, completion: str) -> None:
    ex, _ = tokenize_example(tok, example, 1024, train_on_inputs=False)
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    assert supervised_segments(tok, ex) == [completion + EOT]


def test_without_chat_template_prompt_and_completion_are_concatenated(tok) -> None:
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    ex, _ = tokenize_example(plain, {"prompt": "Q: 2+2? A:", "completion": " 4"}, 1024, False)
    assert tok.decode(ex.input_ids) == "Q: 2+2? A: 4" + EOT
    assert supervised_segments(tok, ex) == [" 4" + EOT]
    ex, _ = tokenize_example(plain, {"instruction": "Add the numbers.", "input": "3 4", "output": "7"}, 1024, False)
    assert tok.decode(ex.input_ids) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n"
        "### Input:\n3 4\n\n### Response:\n7" + EOT)
    assert supervised_segments(tok, ex) == ["7" + EOT]
    with pytest.raises(ValueError, match="chat_template"):
        tokenize_example(plain, CHAT, 1024, False)


def test_text_is_supervised_whole(tok) -> None:
    ex, _ = tokenize_example(tok, {"text": "Once upon a time there was a model."}, 1024, False)
    assert tok.decode(ex.input_ids) == "Once upon a time there was a model." + EOT
    # Every token but the first, which nothing predicts.
    assert ex.labels[0] == IGNORE_INDEX and ex.labels[1:] == ex.input_ids[1:]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_overlong_examples_are_truncated_or_dropped(tok, tmp_path: Path) -> None:
    short = {"prompt": "Hi", "completion": "Hello."}
    long_ = {"prompt": "Please write a short poem about the sea and the sky and the wind. " * 5,
             "completion": "The sea is blue."}
    path = write_jsonl(tmp_path / "d.jsonl", [short, long_, short, long_, long_])
    n_short = len(tokenize_example(tok, short, 1024, False)[0].input_ids)
    max_len = n_short + 4
    examples, stats = tokenize_file(tok, path, max_len, False, overlong="drop")
    assert (stats.n_examples, stats.n_truncated, stats.n_dropped) == (2, 0, 3)
    assert stats.n_tokens == 2 * n_short
    # Truncating a long prompt cuts the whole reply away: nothing is left to learn, so it goes.
    examples, stats = tokenize_file(tok, path, max_len, False, overlong="truncate")
    assert (stats.n_examples, stats.n_truncated, stats.n_dropped, stats.n_empty) == (2, 0, 3, 3)
    # With train_on_inputs the truncated examples still teach something and are kept.
    examples, stats = tokenize_file(tok, path, max_len, True, overlong="truncate")
    assert (stats.n_examples, stats.n_truncated, stats.n_dropped) == (5, 3, 0)
    assert all(len(e.input_ids) <= max_len for e in examples)
    assert stats.n_supervised_tokens == sum(sum(x != IGNORE_INDEX for x in e.labels) for e in examples)
    with pytest.raises(ValueError, match="overlong"):
        tokenize_file(tok, path, max_len, False, overlong="wrap")


LENGTHS = [((i * 37) % 61) + 3 for i in range(103)]  # 3..63 tokens, a fixed irregular spread


@pytest.mark.parametrize("packing", [True, False])
def test_plan_is_deterministic_and_covers_every_example_once(packing: bool) -> None:
    plan = plan_batches(LENGTHS, 4, 64, packing, seed=1, epoch=0)
    assert plan == plan_batches(LENGTHS, 4, 64, packing, seed=1, epoch=0)
    assert plan != plan_batches(LENGTHS, 4, 64, packing, seed=1, epoch=1)
    assert plan != plan_batches(LENGTHS, 4, 64, packing, seed=2, epoch=0)
    flat = [i for batch in plan for row in batch for i in row]
    assert sorted(flat) == list(range(len(LENGTHS)))
    assert all(1 <= len(batch) <= 4 for batch in plan)
    assert all(sum(LENGTHS[i] for i in row) <= 64 for batch in plan for row in batch)
    if not packing:
        assert all(len(row) == 1 for batch in plan for row in batch)


def test_packing_fills_rows_and_beats_padding() -> None:
    examples = [TokenizedExample([1] * n, [1] * n) for n in LENGTHS]
    packed = plan_batches(LENGTHS, 4, 64, True, seed=0, epoch=0)
    padded = plan_batches(LENGTHS, 4, 64, False, seed=0, epoch=0)
    lower_bound = math.ceil(sum(LENGTHS) / 64)
    n_rows = sum(len(b) for b in packed)
    # First-fit-decreasing is within 11/9 OPT + 6/9 of the optimal number of bins.
    assert lower_bound <= n_rows <= math.floor(11 / 9 * lower_bound + 6 / 9) + 1
    assert batch_stats(examples, packed)["padding_fraction"] < batch_stats(examples, padded)["padding_fraction"]
    # group_by_length pads less than batching in random order would.
    import random

    order = list(range(len(LENGTHS)))
    random.Random(0).shuffle(order)
    unsorted = [[[i] for i in order[b:b + 4]] for b in range(0, len(order), 4)]
    assert batch_stats(examples, padded)["padded_tokens"] < batch_stats(examples, unsorted)["padded_tokens"]


def test_group_by_length_keeps_each_step_a_random_sample() -> None:
    """A small set's step is one mega-batch (See Note: length groups of whole steps).

    96 examples of two kinds, 8 per micro-batch and 2 per step: each step must mix both kinds (a
    run of one kind per step biased every gradient and cost the `short` grid cell 10 % of eval
    loss), while its two micro-batches are split by length, so padding stays low.
    """
    lengths = [6 if i % 2 else 60 for i in range(96)]
    for epoch in range(3):
        plan = plan_batches(lengths, 8, 64, False, seed=7, epoch=epoch, grad_accum=2)
        steps = [plan[k] + plan[k + 1] for k in range(0, len(plan), 2)]
        assert all({lengths[i] for row in step for i in row} == {6, 60} for step in steps)
        for a, b in zip(plan[0::2], plan[1::2]):  # the longer examples of a step go in its first micro-batch
            assert min(lengths[row[0]] for row in a) >= max(lengths[row[0]] for row in b)
    ragged = [5, 9, 200, 7, 8, 6, 12, 3] * 8
    first_step = plan_batches(ragged, 4, 256, False, seed=3, epoch=1, grad_accum=2)[:2]
    assert 200 in {ragged[row[0]] for batch in first_step for row in batch}  # a run that cannot fit fails at once


def test_plan_refuses_an_example_longer_than_a_row() -> None:
    with pytest.raises(ValueError, match="example 1 has 65 tokens"):
        plan_batches([3, 65], 2, 64, True, seed=0, epoch=0)


def test_collate_pads_to_longest_row_and_restarts_positions() -> None:
    examples = [TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([8, 9], [8, 9]),
                TokenizedExample([10, 11, 12, 13, 14, 15], [-100, -100, 12, 13, 14, 15])]
    batch = collate(examples, [[0, 1], [2]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0], [10, 11, 12, 13, 14, 15]]
    # The second packed example's first label is masked: it must not be predicted from the first.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100], [-100, -100, 12, 13, 14, 15]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]]
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: see Note: packed attention


def token_loss(model, batch: dict[str, torch.Tensor], use_cache: bool = False) -> torch.Tensor:
    """Sum of next-token cross-entropies over supervised positions / their number."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=use_cache).logits.float()  # (B, T, V)
    target = batch["labels"][:, 1:]  # (B, T-1)
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum", ignore_index=IGNORE_INDEX)
    return losses / (target != IGNORE_INDEX).sum()


def tiny_llama(tok, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, attn_implementation=attn)
    return LlamaForCausalLM(config).float().eval()


def packed_and_unpacked(tok):
    rows = [
        {"text": "The quick brown fox jumps over the lazy dog."},
        {"prompt": "What is the capital of France?", "completion": "The capital of France is Paris."},
        CHAT,
        {"instruction": "Add 3 and 4.", "output": "Add 3 and 4 to get 7."},
        {"text": "One, two, three, four, five."},
    ]
    examples = [tokenize_example(tok, r, 256, False)[0] for r in rows]
    lengths = [len(e.input_ids) for e in examples]
    plan = plan_batches(lengths, 8, max(lengths) + 30, True, seed=0, epoch=0)
    packed_rows = plan[0]
    assert any(len(r) > 1 for r in packed_rows), "the test needs a row holding several examples"
    packed = collate(examples, packed_rows, tok.pad_token_id)
    unpacked = collate(examples, [[i] for row in packed_rows for i in row], tok.pad_token_id)
    return packed, unpacked


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_the_same_loss_as_its_rows(tok, attn: str) -> None:
    model = tiny_llama(tok, attn)
    packed, unpacked = packed_and_unpacked(tok)
    assert (packed["labels"] != IGNORE_INDEX).sum() == (unpacked["labels"] != IGNORE_INDEX).sum()
    with torch.no_grad():
        torch.testing.assert_close(token_loss(model, packed), token_loss(model, unpacked), rtol=1e-5, atol=1e-6)
    # The gradients agree too: what training actually uses.
    grads = []
    for batch in (packed, unpacked):
        model.zero_grad()
        token_loss(model, batch).backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mistake", ["positions_run_on", "model_uses_cache"])
def test_packing_leaks_across_examples_when_misused(tok, mistake: str) -> None:
    """The check above can fail. Positions that run on hide the example boundaries; and with
    `use_cache=True` (the config default) transformers skips packed-sequence detection, which is
    why the training loss must call the model with `use_cache=False` (see Note: packed attention).
    """
    model = tiny_llama(tok, "sdpa")
    packed, unpacked = packed_and_unpacked(tok)
    width = packed["input_ids"].shape[1]
    with torch.no_grad():
        expected = token_loss(model, unpacked)
        if mistake == "positions_run_on":
            leaky = dict(packed, position_ids=torch.arange(width).expand_as(packed["input_ids"]))
            got = token_loss(model, leaky)
        else:
            got = token_loss(model, packed, use_cache=True)
    assert (got - expected).abs() > 1e-4


@pytest.mark.slow
def test_bundled_tokenizer_masks_replies_exactly(bundled_model_dir: Path) -> None:
    """SmolLM2's own template (with its default system prompt) masks the same way."""
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(bundled_model_dir)
    ex, _ = tokenize_example(smol, CHAT, 2048, train_on_inputs=False)
    assert supervised_segments(smol, ex) == ["hello" + EOT, "Add 3 and 4 to get 7." + EOT]
    ex, _ = tokenize_example(smol, {"prompt": "2+2=", "completion": "4"}, 2048, train_on_inputs=False)
    assert supervised_segments(smol, ex) == ["4" + EOT]
