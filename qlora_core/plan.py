"""The batch plan of a run: which micro-batches make each optimizer step, and which steps log,
evaluate and checkpoint.

The plan of an epoch is a pure function of (example lengths, config, epoch), so a resumed run
recomputes it instead of storing it (See Note: exact resume in qlora_core/train.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qlora_core.config import TrainConfig


@dataclass
class RunPlan:
    """Which micro-batches make each optimizer step, and which steps log, evaluate and checkpoint."""

    epoch_batches: list[list[list[list[int]]]]  # epoch -> micro-batches -> rows -> example indices
    grad_accum: int
    total_steps: int
    logging_steps: int
    checkpoint_steps: set[int]
    eval_steps: set[int]

    @property
    def n_epochs(self) -> int:
        return len(self.epoch_batches)

    @property
    def steps_per_epoch(self) -> list[int]:
        return [math.ceil(len(b) / self.grad_accum) for b in self.epoch_batches]

    def step_groups(self, epoch: int) -> list[list[list[list[int]]]]:
        """The epoch's micro-batches in groups of `grad_accum`; the last group may be shorter."""
        batches = self.epoch_batches[epoch]
        return [batches[i : i + self.grad_accum] for i in range(0, len(batches), self.grad_accum)]

    def is_logged(self, step: int) -> bool:
        # Note: logged steps. A step emits one metrics event if it is a multiple of logging_steps,
        # evaluates, checkpoints, or is the last; so valid_* and checkpoint metrics always have an event.
        # train_loss / train_mean_token_accuracy are token-weighted over the micro-batches since the
        # previous logged step (with logging_steps=1: over this step's micro-batches). After a resume
        # the steps between the checkpoint and the crash are replayed and logged again, identically.
        return (
            step % self.logging_steps == 0
            or step in self.eval_steps
            or step in self.checkpoint_steps
            or step == self.total_steps
        )


def make_plan(lengths: list[int], config: TrainConfig, has_valid: bool) -> RunPlan:
    """Plan every epoch's batches (seeded by seed and epoch) and the step schedule.

    Steps never straddle epochs: an epoch of `n` micro-batches is `ceil(n / grad_accum)` steps.
    With `max_steps`, epochs repeat (each reshuffled) until that many steps exist.
    """
    from qlora_core import data

    def epoch_plan(epoch: int) -> list[list[list[int]]]:
        return data.plan_batches(lengths, config.batch_size, config.max_seq_length, config.packing, config.seed, epoch,
                                 config.gradient_accumulation_steps)

    ga = config.gradient_accumulation_steps
    epochs: list[list[list[list[int]]]] = []
    ends: list[int] = []  # cumulative step count at the end of each epoch
    target_epochs = config.n_epochs if config.max_steps is None else None
    while (target_epochs is not None and len(epochs) < target_epochs) or (
        target_epochs is None and (not ends or ends[-1] < config.max_steps)
    ):
        batches = epoch_plan(len(epochs))
        if not batches:
            raise ValueError("the batch plan is empty: no training example fits max_seq_length")
        epochs.append(batches)
        ends.append((ends[-1] if ends else 0) + math.ceil(len(batches) / ga))
    total = ends[-1] if config.max_steps is None else config.max_steps

    if config.checkpoint_steps is not None:
        saves = set(range(config.checkpoint_steps, total + 1, config.checkpoint_steps))
    elif config.n_checkpoints is not None:
        saves = {max(1, round(total * i / config.n_checkpoints)) for i in range(1, config.n_checkpoints + 1)}
    else:
        saves = {e for e in ends if e <= total}  # one per epoch (OpenAI's default)
    saves.add(total)  # the last checkpoint is always the final step
    if not has_valid:
        evals: set[int] = set()
    elif config.eval_steps is None:
        evals = set(saves)
    else:
        evals = set(range(config.eval_steps, total + 1, config.eval_steps)) | {total}
    return RunPlan(epochs, ga, total, config.logging_steps, saves, evals)


def valid_plan(examples: list, config: TrainConfig) -> list[list[list[int]]]:
    """The validation set's micro-batches: one pass, epoch 0's order, the training batch size."""
    from qlora_core import data

    lengths = [len(ex.input_ids) for ex in examples]
    batches = data.plan_batches(lengths, config.batch_size, config.max_seq_length, config.packing, config.seed, 0)
    return batches
