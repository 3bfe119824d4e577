"""The reference side of the benchmark: HF `Trainer` + PEFT + bitsandbytes with the QLoRA repo's defaults.

Mirrors `artidoro/qlora` `qlora.py` (`get_accelerate_model`, `DataCollatorForCausalLM`, its
`TrainingArguments` defaults): NF4 with double quantization, bf16 compute, 
`prepare_model_for_kbit_training` with gradient checkpointing, LoRA r=64 alpha=16 dropout 0.0 on
every `Linear4bit` except `lm_head`, LoRA layers cast to bf16 and norms to fp32 afterwards,
`paged_adamw_32bit`, lr 2e-4 constant (warmup_ratio 0.03), max_grad_norm 0.3, weight decay 0,
`group_by_length`, dynamic padding per batch and the loss on the completion only.

Run as a child of `bench_engine_vs_reference.py` (one fresh process per run, so that its peak RSS
is its own); it writes a JSON result with the load time and the training time kept apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench.common import IGNORE_INDEX, add_side_arguments, cuda_peak_memory, read_jsonl, tokenize_chat  # noqa: E402
from service.lifetime import adopt_from_env  # noqa: E402

logger = logging.getLogger("bench.reference")


def build_model(model_dir: Path, lora_r: int, lora_alpha: int, lora_dropout: float,
                dtype: str = "bfloat16") -> torch.nn.Module:
    """Load the 4-bit base and add LoRA exactly as `qlora.py`'s `get_accelerate_model` does
    (its `--bf16` run, or with `dtype="float32"` its run without `--bf16`/`--fp16`)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from peft.tuners.lora import LoraLayer

    from bench.common import load_reference_base

    model = load_reference_base(model_dir, dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model.gradient_checkpointing_enable()
    # find_all_linear_names: every Linear4bit's leaf name, minus lm_head.
    names = {name.split(".")[-1] for name, mod in model.named_modules() if isinstance(mod, bnb.nn.Linear4bit)}
    names.discard("lm_head")
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        target_modules=sorted(names),
        lora_dropout=lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    # The repository's post-hoc casts (`if args.bf16` for the LoRA layers; an fp32 run keeps them fp32).
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and dtype == "bfloat16":
            module.to(torch.bfloat16)
        if "norm" in name:
            module.to(torch.float32)
        if ("lm_head" in name or "embed_tokens" in name) and hasattr(module, "weight"):
            if dtype == "bfloat16" and module.weight.dtype == torch.float32:
                module.to(torch.bfloat16)
    return model


def main(argv: list[str] | None = None) -> int:
    adopt_from_env()  # started by run_all or a harness: die with it (See Note: owned children)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_side_arguments(parser)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--lora-r", type=int, default=64)  # qlora.py's default; alpha stays 16
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="bfloat16: the repository's prescribed --bf16 run; float32: without --bf16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    set_seed(args.seed)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = build_model(args.model_dir, lora_r=args.lora_r, lora_alpha=16, lora_dropout=0.0, dtype=args.dtype)
    features = []
    for i, chat in enumerate(read_jsonl(args.train_file)):
        ids, labels = tokenize_chat(tokenizer, chat["messages"], args.max_len)
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "row": i})
    n_supervised = sum(sum(1 for t in f["labels"] if t != IGNORE_INDEX) for f in features)
    # Note: padding mask. qlora.py's collator derives attention_mask from `input_ids != pad`,
    # which for SmolLM2 (pad == eos == <|im_end|>) would also hide every end-of-turn token of
    # the chat template; DataCollatorForSeq2Seq pads per batch the same way but masks by length.
    pad_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    order: list[list[int]] = []  # the micro-batches, as example indices, in the order trained

    def collator(batch: list[dict]) -> dict:
        order.append([f["row"] for f in batch])
        return pad_collator([{k: v for k, v in f.items() if k != "row"} for f in batch])

    training_args = TrainingArguments(
        output_dir=str(args.output_dir / "trainer"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        warmup_steps=0.03,  # qlora.py warmup_ratio=0.03 (a float < 1 is a ratio here); "constant" ignores it
        weight_decay=0.0,
        max_grad_norm=0.3,
        optim="paged_adamw_32bit",
        bf16=args.dtype == "bfloat16",
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=True,
        train_sampling_strategy="group_by_length",  # qlora.py: group_by_length=True
        remove_unused_columns=False,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=features,
        data_collator=collator,
        processing_class=tokenizer,
    )
    load_s = time.perf_counter() - t0

    t1, c1 = time.perf_counter(), time.process_time()
    out = trainer.train()
    train_s, train_cpu_s = time.perf_counter() - t1, time.process_time() - c1

    if args.batch_order is not None:
        args.batch_order.write_text(json.dumps(order))
    adapter_dir = args.output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    n_seen = min(len(features), args.steps * args.batch_size * args.grad_accum)
    result = {
        "side": "reference",
        "load_s": load_s,
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,  # all threads; steadier than wall time on a shared machine
        "steps": int(out.global_step),
        "n_examples": n_seen,
        "n_supervised_tokens": n_supervised if n_seen == len(features) else None,
        "train_losses": losses,
        "adapter_dir": str(adapter_dir),
        "self_maxrss_mb": _self_maxrss_mb(),
        **cuda_peak_memory(),
    }
    args.result_json.write_text(json.dumps(result, indent=2))
    logger.info("reference: load %.1fs train %.1fs steps %d losses %s", load_s, train_s, out.global_step, losses)
    return 0


def _self_maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


if __name__ == "__main__":
    raise SystemExit(main())
