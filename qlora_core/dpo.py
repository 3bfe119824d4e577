"""Direct Preference Optimization (Rafailov et al., 2023) on the QLoRA engine.

A preference example is a prompt and two replies, preferred (y+) and not (y-). DPO's sigmoid loss
per pair is

    -log sigmoid(beta * ((log pi(y+) - log ref(y+)) - (log pi(y-) - log ref(y-))))

with log-probabilities summed over each reply's tokens, the policy pi the model being trained and
ref the model it started from. With QLoRA the reference is free: it is the same 4-bit base with the
adapter switched off (PEFT's `disable_adapter()`), or, for a job that continues a fine-tuned model,
that model's adapter as loaded before the first step. Either way its log-probabilities never change,
so they are computed once per example before training (See Note: reference log-probs) and no
second model is held.

A pair trains as two rows of one micro-batch, chosen and rejected side by side, in one forward
through the supervised-position-only projection (`qlora_core.loss.token_nll`). The metrics are
TRL's: `rewards/chosen` = beta * (log pi(y+) - log ref(y+)), `rewards/rejected` likewise,
`rewards/margins` their difference, `rewards/accuracies` the fraction of pairs whose margin is > 0.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qlora_core.data import DataStats, TokenizedExample, collate, tokenize_example, tokenize_file
from qlora_core.loss import IGNORE_INDEX, token_nll
from qlora_core.validate import (PREFERENCE_FORMAT, DatasetError, Problem, first_format, iter_examples,
                                 preference_pair)

logger = logging.getLogger(__name__)

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def tokenize_pairs(tokenizer: Any, path: str | Path, max_seq_length: int,
                   overlong: str = "truncate") -> tuple[list[TokenizedExample], DataStats]:
    """Tokenize a preference file into rows `[chosen_0, rejected_0, chosen_1, rejected_1, ...]`.

    Each reply is the prompt rendered with the chat template plus the reply's turn, supervised on
    the reply alone (earlier assistant turns of the prompt are context). A pair is dropped when
    either row is (too long with overlong="drop", or truncated down to no reply token).

    Raises:
        DatasetError: the file does not validate, or is not a preference file (a line says which).
        ValueError: no pair is left.
    """
    rows: list[TokenizedExample] = []
    stats = DataStats()
    for line_no, obj in iter_examples(path):
        if "preferred_output" not in obj:
            raise DatasetError([Problem(line_no, "wrong_format", "a DPO job needs preference examples "
                                        "('input', 'preferred_output', 'non_preferred_output'); this line is "
                                        "a supervised example")])
        pair = []
        truncated_any = False
        for chat in preference_pair(obj):
            ex, truncated = tokenize_example(tokenizer, chat, max_seq_length, train_on_inputs=False)
            truncated_any |= truncated
            pair.append(ex)
        n_sup = [sum(label != IGNORE_INDEX for label in ex.labels) for ex in pair]
        if (truncated_any and overlong == "drop") or min(n_sup) == 0:
            stats.n_dropped += 1
            stats.n_empty += min(n_sup) == 0
            continue
        stats.n_truncated += truncated_any
        stats.n_tokens += sum(len(ex.input_ids) for ex in pair)
        stats.n_supervised_tokens += sum(n_sup)
        rows.extend(pair)
    stats.n_examples = len(rows) // 2
    if not rows:
        raise ValueError(f"no preference pair of {path} is left to train on (dropped {stats.n_dropped})")
    return rows, stats


def is_preference_file(path: str | Path) -> bool:
    """Whether the first example of a file is a preference pair (a file is all pairs or none: validate.py)."""
    return first_format(path) == PREFERENCE_FORMAT


class WrongMethod(ValueError):
    """A file of preference pairs given to a supervised run."""


def tokenize_for(tokenizer: Any, path: str | Path, config: Any) -> tuple[list[TokenizedExample], DataStats]:
    """Tokenize a training or validation file for `config.method`: rows of pairs for DPO, else examples.

    Raises:
        DatasetError: the file does not validate, or (DPO) holds a supervised line (named).
        WrongMethod: a supervised run was given preference pairs.
        ValueError: nothing is left to train on.
    """
    if config.method == "dpo":  # rows [chosen_0, rejected_0, ...]
        return tokenize_pairs(tokenizer, path, config.max_seq_length, overlong=config.overlong)
    if is_preference_file(path):
        raise WrongMethod(f"{Path(path).name} holds preference pairs: they train with method 'dpo'")
    return tokenize_file(tokenizer, path, config.max_seq_length, config.train_on_inputs, overlong=config.overlong)


def pair_lengths(rows: list[TokenizedExample]) -> list[int]:
    """A pair's length for batch planning: its longer row (the two are padded to one width)."""
    return [max(len(rows[2 * i].input_ids), len(rows[2 * i + 1].input_ids)) for i in range(len(rows) // 2)]


def collate_pairs(rows: list[TokenizedExample], pairs: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """One micro-batch of pairs as 2P rows: chosen and rejected of pair k at rows 2k and 2k+1."""
    return collate(rows, [[2 * p + side] for p in pairs for side in (0, 1)], pad_id)


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's log-probability of its supervised tokens, summed: (B,) fp32, differentiable."""
    nll, rows = token_nll(model, batch)
    out = torch.zeros(batch["labels"].shape[0], dtype=torch.float32, device=nll.device)
    return out.index_add(0, rows, -nll)


@dataclass
class PairStats:
    """Sums over pairs, so callers can average over micro-batches, steps and logging windows."""

    loss_sum: torch.Tensor  # differentiable fp32 scalar
    chosen_sum: float
    rejected_sum: float
    n_right: int  # pairs with margin > 0
    n_pairs: int


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> PairStats:
    """The sigmoid DPO loss of P pairs.

    Args:
        policy: (2P,) log-probs of the rows, chosen and rejected interleaved (`collate_pairs`).
        reference: (P, 2) the reference's log-probs of the same pairs, [chosen, rejected].
        beta: DPO's temperature.
    """
    pol = policy.view(-1, 2)  # (P, 2)
    ref = reference.to(pol.device, torch.float32)
    chosen = beta * (pol[:, 0] - ref[:, 0])  # (P,)
    rejected = beta * (pol[:, 1] - ref[:, 1])  # (P,)
    losses = -F.logsigmoid(chosen - rejected)  # (P,)
    with torch.no_grad():
        n_right = int((chosen > rejected).sum())
    return PairStats(losses.sum(), float(chosen.detach().sum()), float(rejected.detach().sum()), n_right,
                     int(pol.shape[0]))


def window_metrics(window: dict[str, float], prefix: str = "") -> dict[str, float]:
    """`{prefix}loss` and `{prefix}rewards/*` means over the pairs a window summed (see `new_window`)."""
    n = max(window["pairs"], 1)
    chosen, rejected = window["chosen"] / n, window["rejected"] / n
    return {f"{prefix}loss": window["loss"] / n, f"{prefix}rewards/chosen": chosen,
            f"{prefix}rewards/rejected": rejected, f"{prefix}rewards/margins": chosen - rejected,
            f"{prefix}rewards/accuracies": window["right"] / n}


def new_window() -> dict[str, float]:
    return {"loss": 0.0, "chosen": 0.0, "rejected": 0.0, "right": 0, "pairs": 0}


def add_to_window(window: dict[str, float], stats: PairStats) -> None:
    window["loss"] += float(stats.loss_sum.detach())
    window["chosen"] += stats.chosen_sum
    window["rejected"] += stats.rejected_sum
    window["right"] += stats.n_right
    window["pairs"] += stats.n_pairs


# Note: reference log-probs. The reference model's log-probs of every pair are computed once,
# before the first step, in eval mode (no dropout) under no_grad: with the adapter disabled for a
# job on a base model, with it enabled for a job that continues a fine-tuned model (its adapter was
# just loaded and has not moved). They are stored in every checkpoint's state, so a resumed run
# reuses them rather than recomputing them with a policy that has moved, and they do not depend on
# the device a resume lands on. The pass draws no random numbers, so exact resume is untouched.
@torch.no_grad()
def reference_logps(model: Any, rows: list[TokenizedExample], batches: Iterable[list[int]], pad_id: int,
                    device: torch.device, autocast: Any, adapter_off: bool) -> torch.Tensor:
    """(P, 2) reference log-probs of every pair, [chosen, rejected] (See Note: reference log-probs).

    Args:
        model: the PEFT model about to be trained.
        rows: the tokenized rows (`tokenize_pairs`).
        batches: pair indices per micro-batch, covering every pair once.
        pad_id: the tokenizer's padding id.
        device: where the model is.
        autocast: the run's autocast context.
        adapter_off: take them with the adapter disabled (a job on a base model).
    """
    out = torch.zeros(len(rows) // 2, 2, dtype=torch.float32)
    model.eval()
    from qlora_core.fused import training_arithmetic

    # the policy's arithmetic, so that before the first update its log-probs equal these
    ctx = model.disable_adapter() if adapter_off else training_arithmetic()
    try:
        with ctx:
            for pairs in batches:
                b = {k: v.to(device) for k, v in collate_pairs(rows, pairs, pad_id).items()}
                with autocast:
                    logps = sequence_logps(model, b)
                out[torch.tensor(pairs)] = logps.view(-1, 2).float().cpu()
    finally:
        model.train()
    return out


@torch.no_grad()
def evaluate_pairs(model: Any, rows: list[TokenizedExample], batches: Iterable[list[int]], reference: torch.Tensor,
                   beta: float, pad_id: int, device: torch.device, autocast: Any, prefix: str) -> dict[str, float]:
    """DPO loss and rewards of the policy over validation pairs (dropout off); keys `{prefix}loss`, ..."""
    from qlora_core.fused import training_arithmetic

    window = new_window()
    model.eval()
    try:
        for pairs in batches:
            b = {k: v.to(device) for k, v in collate_pairs(rows, pairs, pad_id).items()}
            with autocast, training_arithmetic():  # as the reference's were taken
                logps = sequence_logps(model, b)
            add_to_window(window, dpo_loss(logps, reference[torch.tensor(pairs)], beta))
    finally:
        model.train()
    return window_metrics(window, prefix)

