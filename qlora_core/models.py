"""Load a base model in 4-bit with bitsandbytes and put LoRA adapters on it with PEFT.

This mirrors the QLoRA recipe (Dettmers et al. 2023; `artidoro/qlora`, `qlora.py`, `get_accelerate_model`):
a frozen base quantized to NF4 with double quantization and bf16 compute, LoRA on every linear
layer of the transformer blocks, gradient checkpointing, adapters trained in fp32.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from qlora_core.device import default_device

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str) -> torch.dtype:
    """Map "bfloat16" / "float16" / "float32" to a torch dtype.

    Raises:
        ValueError: If the name is not one of those.
    """
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def load_tokenizer(model_dir: str | Path) -> Any:
    """Load a model directory's tokenizer, ready for training batches.

    The pad token falls back to the eos token (SmolLM2 and Llama define none of their own);
    padding is on the right, since labels and position ids are built left-aligned.

    Raises:
        ValueError: If the tokenizer has neither a pad nor an eos token.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer in {str(model_dir)!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_quantized_model(
    model_dir: str | Path,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    device: str | None = None,
) -> Any:
    """Load a causal LM with every linear layer of its blocks quantized to 4 bits.

    Args:
        model_dir: A store model directory (config.json, model.safetensors, tokenizer).
        quant_type: "nf4" or "fp4". Passed explicitly: bitsandbytes' own default is fp4.
        double_quant: Quantize the absmax scales too (see qlora_core.quant, Note: double quantization).
        compute_dtype: dtype the 4-bit weights are dequantized to for each matmul.
        device: "cuda", "cpu", ... (default: cuda when available, else cpu).

    Returns:
        The model, in eval mode, whose q/k/v/o/gate/up/down projections are
        `bitsandbytes.nn.Linear4bit`; embeddings, norms and lm_head stay in compute_dtype.

    Raises:
        ValueError: On an unknown quant_type or compute_dtype.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    dtype = resolve_dtype(compute_dtype)
    device = device or default_device()
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        quantization_config=bnb_config,
        dtype=dtype,
        attn_implementation="sdpa",
        device_map={"": device},
    )
    model.config.use_cache = False  # the KV cache is useless in training and fights checkpointing
    return model


def add_lora(
    model: Any,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: str | list[str] = "all-linear",
    gradient_checkpointing: bool = True,
    checkpoint_fraction: float = 1.0,
    fused_layers: bool = True,
) -> Any:
    """Freeze the 4-bit base and wrap it with trainable LoRA adapters.

    # Note: what stays 16-bit
    PEFT's `prepare_model_for_kbit_training` casts every non-4-bit parameter to fp32, including
    the embedding matrix (and an untied lm_head): for SmolLM2 that is 28.3M frozen parameters
    going from 57 MB to 113 MB (a 7B Llama: 0.5 GB more), and fp32 norm weights turn the whole
    residual stream fp32, doubling activation memory. The QLoRA repository undoes part of it
    (`qlora.py`: embeddings and lm_head back to bf16) and relies on autocast for the rest.
    Every one of those parameters is frozen, so fp32 copies buy no update precision, and
    RMSNorm already computes its statistics in fp32 internally. So we keep all frozen weights
    in the compute dtype and make only the trainable LoRA A/B matrices fp32, so that small
    AdamW updates are not rounded away in bf16; PEFT casts a layer's input to the adapter's
    dtype and the result back. The residual stream does end up fp32 under 16-bit compute, but
    from the fused layers' fp32 sums, not from fp32 weights (qlora_core/fused.py, Note: the
    update summed in fp32), and only where it must: what backward keeps stays 16-bit.

    Args:
        model: A model from `load_quantized_model`.
        r: LoRA rank.
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: Dropout on the LoRA input.
        target_modules: "all-linear" (every linear in the blocks, not lm_head) or module names.
        gradient_checkpointing: Recompute each block in backward (use_reentrant=False).
        checkpoint_fraction: With checkpointing, the fraction of blocks recomputed.
        fused_layers: Give LoRA, RMSNorm and SwiGLU modules the lean autograd of `qlora_core.fused`.

    Returns:
        A `peft.PeftModel` whose only trainable parameters are the LoRA A and B matrices.

    Raises:
        ValueError: If r < 1, alpha <= 0 or dropout not in [0, 1).
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"lora_r must be >= 1, got {r}")
    if alpha <= 0:
        raise ValueError(f"lora_alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout}")

    for param in model.parameters():
        param.requires_grad = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        select_checkpointed_layers(model, checkpoint_fraction)
        # Checkpointed blocks need an input that requires grad, or backward never reaches LoRA
        # weights inside them (the embeddings are frozen).
        model.enable_input_require_grads()
    lora_config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_config)
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()  # See Note: what stays 16-bit
    if fused_layers:
        from qlora_core.fused import apply_fused_layers

        apply_fused_layers(peft_model)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("LoRA r=%d alpha=%s on %s: %d trainable parameters", r, alpha, target_modules, n_train)
    return peft_model


def select_checkpointed_layers(model: Any, fraction: float) -> int:
    """Keep gradient checkpointing on only `fraction` of the decoder layers, spread evenly.

    # Note: selective checkpointing. Full checkpointing recomputes every block's forward in
    # backward (~30% of a step's FLOPs); no checkpointing keeps every block's activations. In
    # between, each un-checkpointed block trades ~(tokens x 20 KB) of memory for its recompute, and
    # spreading them evenly keeps the memory peak flat over backward. transformers checks the
    # per-layer `gradient_checkpointing` flag of its `GradientCheckpointingLayer`s on every call.

    Returns:
        The number of layers that stay checkpointed.

    Raises:
        ValueError: if `fraction` is outside [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"checkpoint_fraction must be in [0, 1], got {fraction}")
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    n_keep = round(fraction * len(layers))
    keep = {round(i * len(layers) / n_keep) for i in range(n_keep)} if n_keep else set()
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = layer.gradient_checkpointing and i in keep
    return sum(1 for layer in layers if layer.gradient_checkpointing)
