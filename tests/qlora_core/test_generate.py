"""Greedy generation for the demo: chat prompts via the template, batching changes nothing."""

from __future__ import annotations

import pytest
import torch

from qlora_core.generate import generate, render_prompt

PROMPTS = [
    [{"role": "user", "content": "Add 3 and 4."}],
    "The capital of France is",
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is the answer? Please write a short poem."}],
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from qlora_core.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, load_tokenizer(tiny_model_dir)


def test_chat_prompt_ends_with_the_assistant_turn(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    text, add_special = render_prompt(tokenizer, PROMPTS[0])
    assert text.endswith("<|im_start|>assistant\n") and not add_special
    assert render_prompt(tokenizer, "plain") == ("plain", True)


def test_batched_greedy_equals_one_by_one(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=12)
    single = [generate(model, tokenizer, [p], max_new_tokens=12)[0] for p in PROMPTS]
    assert batched == single
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=12) == batched  # greedy: deterministic
    assert tokenizer.padding_side == "right", "the tokenizer is left as training needs it"
    for text in batched:
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 12 + 2  # re-tokenizing may merge


def test_bad_arguments(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tokenizer, ["x"], max_new_tokens=0)
    tokenizer_without_template = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer_without_template.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        render_prompt(tokenizer_without_template, PROMPTS[0])
