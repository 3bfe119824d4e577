"""Greedy generation for a handful of prompts: the demo's "base vs. fine-tuned" answers.

Chat prompts (lists of `{"role", "content"}`) go through the tokenizer's chat template with
`add_generation_prompt=True`, exactly as the training data did (`qlora_core.data`), so a fine-tuned
adapter sees the format it learned. Prompts are batched with left padding, the layout decoder-only
models need for batched `generate` (transformers' generation docs).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

Prompt = str | list[dict[str, str]]


def render_prompt(tokenizer, prompt: Prompt) -> tuple[str, bool]:
    """Return the prompt text and whether the tokenizer should still add its special tokens.

    Raises:
        ValueError: if a chat prompt is given to a tokenizer without a chat template.
    """
    if isinstance(prompt, str):
        return prompt, True
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat prompt given but the tokenizer has no chat_template")
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    # The template already wrote every special token it wants.
    return text, False


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[Prompt],
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> list[str]:
    """Greedy-decode a completion for each prompt.

    Args:
        model: a causal LM (base, PEFT-wrapped or merged).
        tokenizer: its tokenizer (pad token set, as `qlora_core.models.load_tokenizer` does).
        prompts: plain strings, or chat message lists rendered with the chat template.
        max_new_tokens: cap on generated tokens per prompt.
        batch_size: prompts per `generate` call.

    Returns:
        The generated text of each prompt (without the prompt, special tokens skipped), in order.

    Raises:
        ValueError: if `max_new_tokens < 1`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [render_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            # Rendered chat text and raw text need different special-token handling: encode apart.
            encoded = [tokenizer(text, add_special_tokens=special)["input_ids"] for text, special in chunk]
            batch = tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt").to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )  # (B, T_prompt + T_new)
            new_tokens = out[:, batch["input_ids"].shape[1] :]  # (B, T_new)
            outputs.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        if was_training:
            model.train()
    return outputs
