"""Our DPO step against TRL's `DPOTrainer` (the reference implementation), on one tiny 4-bit model.

Both sides get the same PEFT model (NF4 base, LoRA with non-zero B, so the policy differs from its
reference) and the same pairs, tokenized by TRL itself: its `prompt_ids`, `chosen_ids` and
`rejected_ids` become our rows, supervised on the completion. TRL runs with `ref_model=None`, so its
reference is the model with the adapter disabled, as ours is for a job on a base model. One step's
loss, rewards and LoRA gradients must agree within fp32 rounding.

What differs by design and is left out by feeding TRL's tokens: our own tokenization supervises a
reply through its end-of-turn token (`<|im_end|>`), as supervised training does, where TRL's also
takes the newline that ChatML's template writes after it.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import pytest
import torch

from qlora_core import dpo
from qlora_core.data import TokenizedExample
from qlora_core.loss import IGNORE_INDEX
from qlora_core.models import add_lora, load_quantized_model, load_tokenizer
from qlora_core.train import _keep_4bit_layout



BETA = 0.2


def _pairs() -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {i} plus {i + 2}?"}],
             "chosen": [{"role": "assistant", "content": f"Answer: {2 * i + 2}."}],
             "rejected": [{"role": "assistant", "content": f"it could be {2 * i + 3} I guess" + " maybe" * i}]}
            for i in range(4)]


def _perturb(model, seed: int) -> None:  # type: ignore[no-untyped-def]
    """Random LoRA B (and A) in the active adapter: a policy that differs from any reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." in name and ("lora_B" in name or "lora_A" in name):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _grads(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("reference", ["base", "fine_tuned"])
def test_one_step_equals_trl_dpo_trainer(tiny_model_dir: Path, reference: str) -> None:
    """`base`: TRL wraps the base itself (`peft_config`), so its reference is the adapter disabled, as
    ours for a job on a base model. `fine_tuned`: TRL gets a PEFT model whose adapter is trained and
    copies it as a frozen "ref" adapter, as ours takes a continued fine-tuned model as its reference."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = load_tokenizer(tiny_model_dir)
    base = load_quantized_model(tiny_model_dir, device="cpu", compute_dtype="float32")
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, beta=BETA, loss_type=["sigmoid"],
                     max_steps=1, report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
                     dataloader_num_workers=0, logging_steps=1)
    data = Dataset.from_list(_pairs())
    if reference == "base":
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = DPOTrainer(model=base, ref_model=None, args=args, train_dataset=data, processing_class=tok,
                             peft_config=lora)
    else:
        model = add_lora(base, 8, 16, 0.0, gradient_checkpointing=False)
        _perturb(model, seed=1)  # the fine-tuned adapter TRL copies as its "ref"
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=data, processing_class=tok)
    model = trainer.model
    _keep_4bit_layout(model)  # as qlora_core.train does (Note: CPU inference repacking): one 4-bit path for both
    assert ("ref" in model.peft_config) == (reference == "fine_tuned")
    examples = [trainer.train_dataset[i] for i in range(4)]

    # Ours on the same tokens: rows prompt+chosen / prompt+rejected, supervised on the completion.
    rows = []
    for ex in examples:
        for side in ("chosen_ids", "rejected_ids"):
            ids = list(ex["prompt_ids"]) + list(ex[side])
            labels = [IGNORE_INDEX] * len(ex["prompt_ids"]) + list(ex[side])
            rows.append(TokenizedExample(input_ids=ids, labels=labels))
    pairs = [0, 1, 2, 3]
    # The fine-tuned reference is TRL's frozen "ref" copy of the adapter: the exact adapter given,
    # while TRL's setup rounds its trainable "default" copy through bf16 on this CPU. Ours takes the
    # model with that adapter on, as it does with a continued model's adapter freshly loaded.
    from trl.trainer.utils import use_adapter

    with use_adapter(model, "ref") if reference == "fine_tuned" else contextlib.nullcontext():
        ref_logps = dpo.reference_logps(model, rows, [pairs], tok.pad_token_id, torch.device("cpu"),
                                        torch.autocast("cpu", enabled=False), adapter_off=reference == "base")
    _perturb(model, seed=2)  # a step later: the policy has moved away from the reference

    # TRL's step: its collator, its loss (mean over pairs), its backward.
    model.train()
    trl_loss = trainer.compute_loss(model, trainer.data_collator(examples))
    trl_loss.backward()
    trl_grads = _grads(model)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    model.train()
    stats = dpo.dpo_loss(dpo.sequence_logps(model, dpo.collate_pairs(rows, pairs, tok.pad_token_id)), ref_logps, BETA)
    (stats.loss_sum / stats.n_pairs).backward()
    our_grads = _grads(model)

    torch.testing.assert_close(stats.loss_sum / stats.n_pairs, trl_loss.detach(), rtol=1e-5, atol=1e-6)
    assert abs(stats.chosen_sum / 4 - logged["rewards/chosen"]) < 1e-5
    assert abs(stats.rejected_sum / 4 - logged["rewards/rejected"]) < 1e-5
    assert stats.n_right / 4 == logged["rewards/accuracies"]
    assert abs(logged["rewards/margins"]) > 1e-3  # the policy is not its reference: a real comparison
    assert trl_grads.keys() == our_grads.keys() and len(our_grads) > 0
    assert all(".default." in n for n in our_grads)  # TRL's "ref" copy stays frozen, as our reference does
    for name in trl_grads:
        # Within the rounding of the dtype the gradient is held in: fp32, or bf16 where PEFT made the
        # adapter in the base layer's dtype (then one sum in another order moves the last bit).
        got, want = our_grads[name], trl_grads[name]
        assert got.dtype == want.dtype, name
        ulp = torch.finfo(want.dtype).eps * float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2 * ulp, msg=name)
