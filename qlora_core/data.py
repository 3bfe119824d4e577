"""From validated JSONL to training batches: tokenization, label masks, batch plans, packing.

- Chat examples are rendered with the tokenizer's own chat template (`apply_chat_template`), so
  a fine-tuned model sees exactly the format it will be prompted with. Prompt/completion and
  alpaca examples become a user/assistant exchange when the tokenizer has a template, and a plain
  `prompt + completion + eos` otherwise. Text examples are trained on whole.
- Loss on the target only (the QLoRA recipe, `artidoro/qlora`'s `train_on_source=False`): labels
  are -100 except on each assistant message's content plus its end-of-turn token, unless
  `train_on_inputs`. Assistant messages with `"weight": 0` are never supervised (OpenAI's format).
- Labels come from character spans of the rendered text mapped to tokens through the fast
  tokenizer's offsets, on one tokenization of the whole example: no prefix is tokenized on its
  own, so a BPE merge across a turn boundary cannot shift the mask.
- Batches are planned up front, deterministically from (seed, epoch): either packed rows, filled
  first-fit-decreasing up to `max_seq_length` tokens (TRL's `pack_dataset` uses the best-fit
  sibling of the same bin-packing heuristic), or one example per row with similar lengths
  grouped together (HF `group_by_length`).

See Note: packed attention for how packed examples are kept apart.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_core.validate import detect_format, iter_examples

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
OVERLONG = ("truncate", "drop")


@dataclass
class TokenizedExample:
    """One example as token ids; `labels[i]` is `input_ids[i]` where supervised, else -100."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class DataStats:
    """Counts from tokenizing a file. `n_examples` counts the examples kept."""

    n_examples: int = 0
    n_truncated: int = 0
    n_dropped: int = 0  # overlong examples dropped (overlong="drop") plus `n_empty`
    n_tokens: int = 0
    n_supervised_tokens: int = 0
    n_empty: int = 0  # dropped because no token was left to supervise (e.g. truncated away)


def _to_messages(example: dict, fmt: str) -> tuple[list[dict[str, str]], list[bool]]:
    """Normalise a chat, prompt/completion or alpaca example to messages and which are supervised."""
    if fmt == "chat":
        messages = [{"role": m["role"], "content": m["content"]} for m in example["messages"]]
        trained = [m["role"] == "assistant" and m.get("weight", 1) == 1 for m in example["messages"]]
        return messages, trained
    if fmt == "prompt_completion":
        prompt, completion = example["prompt"] or "", example["completion"]
    elif fmt == "alpaca":
        extra = example.get("input") or ""
        prompt = example["instruction"] + (f"\n\n{extra}" if extra else "")
        completion = example["output"]
    else:
        raise ValueError(f"example has no conversational form: keys {sorted(example)}")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], [False, True]


# Stanford Alpaca's PROMPT_DICT (tatsu-lab/stanford_alpaca, train.py).
_ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
                  "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


def _alpaca_prompt(example: dict) -> str:
    extra = example.get("input") or ""
    return _ALPACA_PROMPT.format(ctx=", paired with an input that provides further context" if extra else "",
                                 instruction=example["instruction"], input=f"### Input:\n{extra}\n\n" if extra else "")


def _end_of_turn(text: str, start: int, specials: list[str]) -> int:
    """End index of the first special token that opens `text[start:]` after optional spaces."""
    rest = text[start:]
    stripped = rest.lstrip(" \t")
    offset = start + len(rest) - len(stripped)
    for tok in specials:
        if tok and stripped.startswith(tok):
            return offset + len(tok)
    return start


def _render(tokenizer: PreTrainedTokenizerBase, example: dict
            ) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]], bool]:
    """Render an example to text; return (text, supervised spans, never-supervised spans, add_special)."""
    eos = tokenizer.eos_token or ""
    fmt = detect_format(example)
    if fmt is None:
        raise ValueError(f"unknown example format: keys {sorted(example)[:10]}")
    if fmt == "text":
        text = example["text"] + eos
        return text, [(0, len(text))], [], True
    messages, trained = _to_messages(example, fmt)
    if tokenizer.chat_template is None:
        if fmt == "chat":
            raise ValueError("chat examples need a tokenizer with a chat_template")
        prompt, completion = messages[0]["content"], messages[1]["content"] + eos
        if fmt == "alpaca":  # a base model without a template gets Stanford Alpaca's prompt
            prompt = _alpaca_prompt(example)
        return prompt + completion, [(len(prompt), len(prompt) + len(completion))], [], True
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    # Longest first, so "<|im_end|>" wins over a shorter special token that prefixes it.
    specials = sorted({eos, *tokenizer.all_special_tokens}, key=len, reverse=True)
    supervised, excluded = [], []
    cursor = 0
    # Walk the messages in order: each content is found after the previous one, so an assistant
    # reply repeated inside an earlier user message cannot be mistaken for the reply itself.
    for msg, is_trained in zip(messages, trained):
        content = msg["content"]
        start = text.find(content, cursor)
        if start < 0 and content.strip():  # templates that trim content
            content = content.strip()
            start = text.find(content, cursor)
        if start < 0:
            raise ValueError(f"chat template did not render message content {content[:60]!r} verbatim")
        end = start + len(content)
        cursor = end
        if msg["role"] != "assistant":
            continue
        span = (start, _end_of_turn(text, end, specials))
        (supervised if is_trained else excluded).append(span)
    return text, supervised, excluded, False


def _overlaps(a: int, b: int, spans: list[tuple[int, int]]) -> bool:
    b = max(b, a + 1)  # zero-width offsets (some special tokens) still occupy their position
    return any(a < e and b > s for s, e in spans)


def tokenize_example(tokenizer: PreTrainedTokenizerBase, example: dict, max_seq_length: int,
                     train_on_inputs: bool) -> tuple[TokenizedExample, bool]:
    """Tokenize one validated example and mask its labels.

    Args:
        tokenizer: a fast tokenizer (offsets are used to map text spans to tokens).
        example: one example in any accepted format (see `qlora_core.validate`).
        max_seq_length: examples longer than this are cut to this many tokens.
        train_on_inputs: supervise every token (except weight-0 assistant messages).

    Returns:
        (example, was_truncated). The first label is always -100: nothing predicts token 0, and
        in a packed row it would otherwise be predicted from the previous example.

    Raises:
        ValueError: if the tokenizer cannot give offsets or the template hides message content.
    """
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be >= 2, got {max_seq_length}")
    text, supervised, excluded, add_special = _render(tokenizer, example)
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = enc.get("offset_mapping")
    if offsets is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} gives no offsets; a fast tokenizer is needed")
    special_ids = set(tokenizer.all_special_ids)
    labels = []
    for tok, (a, b) in zip(ids, offsets):
        special_added = add_special and a == b == 0 and tok in special_ids
        if special_added or _overlaps(a, b, excluded):
            keep = False  # e.g. a BOS the tokenizer added, or a weight-0 reply
        else:
            keep = train_on_inputs or _overlaps(a, b, supervised)
        labels.append(tok if keep else IGNORE_INDEX)
    if labels:
        labels[0] = IGNORE_INDEX
    truncated = len(ids) > max_seq_length
    if truncated:
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    return TokenizedExample(input_ids=ids, labels=labels), truncated


def tokenize_file(tokenizer: PreTrainedTokenizerBase, path: str | Path, max_seq_length: int,
                  train_on_inputs: bool, overlong: str = "truncate") -> tuple[list[TokenizedExample], DataStats]:
    """Tokenize every example of a JSONL file.

    Args:
        tokenizer: see `tokenize_example`.
        path: a JSONL file in any accepted format.
        max_seq_length: longest example kept, in tokens.
        train_on_inputs: see `tokenize_example`.
        overlong: "truncate" cuts longer examples to `max_seq_length`; "drop" leaves them out.

    Returns:
        (examples kept, counts). Examples left with no supervised token are dropped and counted.

    Raises:
        DatasetError: if the file does not validate.
        ValueError: for an unknown `overlong`, or if no example is left.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    examples: list[TokenizedExample] = []
    stats = DataStats()
    for line_no, obj in iter_examples(path):
        ex, truncated = tokenize_example(tokenizer, obj, max_seq_length, train_on_inputs)
        if truncated and overlong == "drop":
            stats.n_dropped += 1
            continue
        n_sup = sum(label != IGNORE_INDEX for label in ex.labels)
        if n_sup == 0:
            logger.warning("line %d of %s has no supervised token left; dropped", line_no, path)
            stats.n_dropped += 1
            stats.n_empty += 1
            continue
        stats.n_truncated += truncated
        stats.n_tokens += len(ex.input_ids)
        stats.n_supervised_tokens += n_sup
        examples.append(ex)
    stats.n_examples = len(examples)
    if not examples:
        raise ValueError(f"no example of {path} is left to train on (dropped {stats.n_dropped})")
    return examples, stats


def _first_fit_decreasing(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Pack items (already in decreasing length) into rows of `capacity` tokens, first fit.

    A max segment tree over the rows' free space finds the first row that fits in O(log n),
    so a million examples pack in seconds rather than the O(n * rows) of a linear scan.
    """
    size = 1
    while size < max(len(order), 1):
        size *= 2
    free = [0] * (2 * size)  # leaves: free tokens of row i (rows not opened yet: capacity)
    for i in range(size):
        free[size + i] = capacity
    for i in range(size - 1, 0, -1):
        free[i] = max(free[2 * i], free[2 * i + 1])
    rows: list[list[int]] = []
    for idx in order:
        need = lengths[idx]
        node = 1
        while node < size:  # descend to the leftmost leaf with enough room
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(idx)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def plan_batches(lengths: list[int], batch_size: int, max_seq_length: int, packing: bool, seed: int,
                 epoch: int, grad_accum: int = 1) -> list[list[list[int]]]:
    """Plan one epoch: batches of rows of example indices, the same for the same arguments.

    Args:
        lengths: token count of each example.
        batch_size: rows per batch (a packed row holds several examples).
        max_seq_length: row capacity in tokens when packing.
        packing: pack examples first-fit-decreasing into rows; else one example per row, with
            examples of similar length batched together (as HF's `group_by_length`).
        seed, epoch: the shuffle; each epoch gets a different order.
        grad_accum: micro-batches per optimizer step; the training loop takes the returned
            batches `grad_accum` at a time, in order.

    Returns:
        batches -> rows -> example indices; every index appears exactly once.

    Raises:
        ValueError: for a non-positive batch size, or an example longer than `max_seq_length`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    too_long = [i for i, n in enumerate(lengths) if n > max_seq_length or n < 1]
    if too_long:
        i = too_long[0]
        raise ValueError(f"example {i} has {lengths[i]} tokens, outside 1..max_seq_length={max_seq_length}")
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if packing:
        # Stable sort of a shuffled order: equal lengths pack differently each epoch.
        order.sort(key=lambda i: -lengths[i])
        rows = _first_fit_decreasing(order, lengths, max_seq_length)
        rng.shuffle(rows)
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    # group_by_length, as transformers' `LengthGroupedSampler` does it for the Trainer.
    #
    # Note: length groups of whole steps. A random order is cut into mega-batches of whole
    # optimizer steps (`batch_size * grad_accum` examples each): 50 steps, but no more than a
    # quarter of the epoch and no less than one step. Each mega-batch is sorted by length and cut
    # into micro-batches, which the loop takes in this order, so a step draws its examples from
    # one random mega-batch. On a small dataset a mega-batch is one step: its gradient is the
    # gradient of a random sample, and sorting only splits it into micro-batches with little
    # padding. We used to sort 50 micro-batches at a time and then shuffle the micro-batches: on
    # a 96-example set that sorted the whole epoch, so each step held runs of near-identical
    # examples (all short "none" answers, say), and a 3-epoch job on the grid's `short`
    # extraction set ended at eval loss 1.12-1.24 where the reference reached 0.99-1.05 (seeds 1,
    # 2 and 42, fp32, `bench/bench_grid.py --epochs 3`); fed the reference's batch order, our
    # engine reproduced its losses to three decimals.
    # The longest example is swapped into the first step, so a run that does not fit fails
    # at once rather than hours in.
    step = batch_size * max(1, grad_accum)
    mega = step * max(1, min(len(order) // (step * 4), 50))
    megas = [sorted(order[m:m + mega], key=lambda i: -lengths[i]) for m in range(0, len(order), mega)]
    if not megas:
        return []
    longest = max(range(len(megas)), key=lambda k: lengths[megas[k][0]])
    megas[0][0], megas[longest][0] = megas[longest][0], megas[0][0]
    return [[[i] for i in chunk[b:b + batch_size]] for chunk in megas for b in range(0, len(chunk), batch_size)]


def row_lengths(examples: list[TokenizedExample], rows: list[list[int]]) -> list[int]:
    """The real tokens of each row of one batch (its examples' lengths summed); the batch's width is the max."""
    return [sum(len(examples[i].input_ids) for i in row) for row in rows]


def collate(examples: list[TokenizedExample], rows: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Build one batch: each row is the concatenation of its examples, right-padded.

    Note: packed attention. There is no `attention_mask` on purpose. With `attention_mask=None`,
    no cache and `position_ids` given, transformers (`masking_utils.find_packed_sequence_indices`)
    starts a new sequence wherever the position does not grow by one, and builds a causal mask
    that is block-diagonal per sequence (sdpa, eager, flex; flash-attention uses the same
    position_ids as varlen boundaries). So `position_ids` restart at 0 for every example, and the
    model must be called with `use_cache=False` (with a cache transformers skips the detection).
    Pads only sit at a row's end, after every real token, so causality alone hides them; their
    positions continue the last example's so they never open a sequence of their own.

    Args:
        examples: all tokenized examples of the dataset.
        rows: example indices per row (one batch from `plan_batches`).
        pad_token_id: id written into padded positions (their labels are -100).

    Returns:
        `input_ids`, `labels` and `position_ids`, each (B, T) int64 with T the longest row.
    """
    import torch

    if not rows or any(not row for row in rows):
        raise ValueError(f"every row needs at least one example, got rows {rows!r}")
    lengths = row_lengths(examples, rows)
    batch, width = len(rows), max(lengths)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((batch, width), dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        start = 0
        for i in row:
            ex = examples[i]
            n = len(ex.input_ids)
            input_ids[b, start:start + n] = torch.tensor(ex.input_ids, dtype=torch.long)
            labels[b, start:start + n] = torch.tensor(ex.labels, dtype=torch.long)
            labels[b, start] = IGNORE_INDEX  # never predict an example from the one before it
            position_ids[b, start:start + n] = torch.arange(n)
            start += n
        last = len(examples[row[-1]].input_ids)
        position_ids[b, start:] = torch.arange(last, last + width - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def real_token_index(examples: list[TokenizedExample], rows: list[list[int]]) -> tuple[torch.Tensor, int]:
    """The real (not padded) positions of `collate(examples, rows, ...)`'s batch, flattened.

    Returns:
        (indices into the B * T positions in row-major order, (N,) int64; B * T).
    """
    import torch

    lengths = row_lengths(examples, rows)
    width = max(lengths)
    index = torch.cat([torch.arange(b * width, b * width + n) for b, n in enumerate(lengths)])  # (N,)
    return index, len(rows) * width


def batch_stats(examples: list[TokenizedExample], batches: list[list[list[int]]]) -> dict[str, Any]:
    """Rows, real tokens, padded slots and the padding fraction of a plan (for logs and benches)."""
    rows = sum(len(b) for b in batches)
    real = sum(len(examples[i].input_ids) for b in batches for row in b for i in row)
    slots = sum(len(b) * max(row_lengths(examples, b)) for b in batches)
    return {"rows": rows, "tokens": real, "padded_tokens": slots - real,
            "padding_fraction": (slots - real) / slots if slots else 0.0}
