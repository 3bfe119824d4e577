"""Tiny, offline stand-ins for a real base model, for tests and benchmarks.

A real base model (SmolLM2-135M) takes seconds to load and minutes to train on a CPU; the unit
tests need something with the same *shape of interface* that loads in milliseconds. This module
builds (1) a byte-level BPE tokenizer trained in memory on a small built-in corpus, with the
ChatML chat template SmolLM2-Instruct uses (`<|im_start|>role\\ncontent<|im_end|>\\n`), and
(2) a Hugging Face directory holding a randomly initialised Llama of a few hundred thousand
parameters plus that tokenizer and the store's `qlora_model.json` manifest, so it can be used
wherever a model directory from `qlora_core.store` is expected.

Everything is deterministic: the same arguments give byte-identical weights and vocabulary.
Nothing here touches the network.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB_SIZE = 400

# SmolLM2-Instruct's template, minus its default system prompt (a tiny model has no use for it):
# each message as `<|im_start|>role\ncontent<|im_end|>\n`, and with add_generation_prompt the
# opening of an assistant turn. `{% generation %}` marks let `return_assistant_tokens_mask` work.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A small English + arithmetic corpus: enough merges for common words and digits so that
# tokenized examples are a realistic handful of tokens per word, not one per byte.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? She sold 48 + 24 = 72 clips.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "The answer is 10. The answer is 42. The answer is 7. #### 72",
    "You are a helpful assistant. Answer the question step by step.",
    "user assistant system question answer model train test data example",
    "Translate to French: hello world. Bonjour le monde.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 24 32 48 64 100 128 256 1000",
    "Add 3 and 4 to get 7. Multiply 6 by 7 to get 42. Subtract 5 from 12 to get 7.",
    "A list of colors: red, green, blue, yellow, black, white, orange, purple.",
    "Once upon a time there was a little model that learned to count and to speak.",
    "Please write a short poem about the sea and the sky and the wind.",
    "If a train travels 60 miles in 1 hour, how far does it travel in 3 hours? 180 miles.",
]


def build_tiny_tokenizer():
    """Train a tiny byte-level BPE tokenizer in memory and wrap it for transformers.

    Returns:
        A `PreTrainedTokenizerFast` with about 400 tokens, the special tokens `<|im_start|>`,
        `<|im_end|>` (eos) and `<|endoftext|>` (bos, unk and pad), padding on the right and a
        ChatML `chat_template`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repetition makes merge counts well separated, so training is order-stable.
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        model_max_length=2048,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_llama_dir(
    path: str | Path,
    hidden_size: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    intermediate_size: int = 128,
    seed: int = 0,
    model_id: str = "tiny-llama",
) -> Path:
    """Write a randomly initialised tiny Llama model directory, loadable like a store model.

    Args:
        path: Directory to create (parents too); existing files of the same names are replaced.
        hidden_size: Model width; keep it a multiple of 64 so 4-bit blocks tile the weights.
        n_layers: Number of decoder layers.
        n_heads: Attention heads (also the key/value heads).
        intermediate_size: MLP width.
        seed: Seed of the random initialisation; the same seed gives the same weights.
        model_id: The id written into the `qlora_model.json` manifest.

    Returns:
        The directory, holding config.json, model.safetensors, the tokenizer files and
        qlora_model.json.

    Raises:
        ValueError: If hidden_size is not divisible by n_heads.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % n_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by n_heads {n_heads}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    # fork_rng keeps the caller's global RNG untouched while making init reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    manifest = {
        "id": model_id,
        "architecture": "LlamaForCausalLM",
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "source": "qlora_core.testing.build_tiny_llama_dir",
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    (out / "qlora_model.json").write_text(json.dumps(manifest, indent=2) + "\n")
    logger.debug("built tiny llama at %s (%d params)", out, manifest["n_parameters"])
    return out


# Llama shapes for memory and speed checks with random weights (nothing downloaded). "7b" is
# Llama-2-7B's (6,738,415,616 parameters); "tiny" is the same architecture at test size.
LLAMA_SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512, max_position_embeddings=4096),
}  # fmt: skip


def llama_shape_config(shape: str):
    """A `LlamaConfig` of a named shape (see LLAMA_SHAPES), untied embeddings, bf16.

    Raises:
        ValueError: an unknown shape name.
    """
    from transformers import LlamaConfig

    if shape not in LLAMA_SHAPES:
        raise ValueError(f"shape must be one of {sorted(LLAMA_SHAPES)}, got {shape!r}")
    tok = build_tiny_tokenizer()
    return LlamaConfig(**LLAMA_SHAPES[shape], tie_word_embeddings=False, torch_dtype="bfloat16",
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def count_parameters(config) -> int:
    """Parameters of a causal LM built from `config` on the meta device (no memory allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return int(sum(p.numel() for p in model.parameters()))


def build_llama_shape_dir(path: str | Path, shape: str = "7b", seed: int = 0, device: str = "cpu",
                          shard_bytes: int = 2 * 1024**3) -> Path:
    """Write a Llama of a named shape with random weights as a store-like model directory.

    The model is laid out on the meta device and each tensor is drawn on its own (N(0, 0.02), norms
    at 1, as transformers initialises Llama), in bf16, on `device` (a GPU draws 6.7B numbers in
    seconds), then written in shards of about `shard_bytes` with a safetensors index: peak host
    memory is one shard, not the model. The tokenizer is the tiny ChatML one of this module (its
    ids are a subset of any shape's vocabulary).

    Args:
        path: directory to create.
        shape: a key of LLAMA_SHAPES.
        seed: the same seed gives the same weights on the same device.
        device: where the random numbers are drawn ("cpu" or "cuda").
        shard_bytes: target size of one safetensors shard.

    Returns:
        The directory (config.json, model shards and index, tokenizer, qlora_model.json).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = llama_shape_config(shape)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        layout = AutoModelForCausalLM.from_config(config)
    entries = [(name, tuple(p.shape)) for name, p in layout.state_dict().items()]
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:  # write the shard in hand: one shard in host memory at a time
        nonlocal size
        fname = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
        shard.clear()
        size = 0

    for name, shp in entries:
        if "norm" in name:
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:
            t = torch.empty(shp, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=gen).cpu()
        if size and size + t.numel() * 2 > shard_bytes:
            flush()
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    build_tiny_tokenizer().save_pretrained(out)
    manifest = {"id": f"random-llama-{shape}", "architecture": "LlamaForCausalLM",
                "n_parameters": sum(math.prod(s) for _, s in entries),
                "source": "qlora_core.testing.build_llama_shape_dir",
                "created_at": datetime.now(timezone.utc).isoformat()}  # fmt: skip
    (out / "qlora_model.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out
