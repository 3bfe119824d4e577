"""4-bit data types, bits-per-parameter accounting and a training-memory estimate for QLoRA.

Where the ideas come from: QLoRA (Dettmers et al. 2023, arXiv 2305.14314), section 3: NormalFloat4
(NF4) quantiles of N(0, 1), blockwise absmax scaling in blocks of 64, and double quantization of
those scales. The tables below are bitsandbytes' (`bitsandbytes.functional.get_4bit_type`), the
library that actually stores our weights; the tests check them against it.

`measured_footprint` walks a loaded model and counts the bytes of the real tensors bitsandbytes
holds (packed 4-bit codes, absmax scales, second-level scales), so the reported bits per parameter
is a measurement, not the formula repeated. `estimate_training_memory` predicts peak memory of a
QLoRA step from nothing but a model's config.json, for `qlora models inspect` and the worker's
"will this fit" check.
"""

from __future__ import annotations

import math
from typing import Any

# bitsandbytes' NF4 table, in code order (code 7 is the exact zero; 7 negative, 8 positive values).
NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# bitsandbytes' FP4 (E2M1, no inf/nan, normalised by its max 6.0) in code order; bit 3 is the sign.
FP4_CODE: tuple[float, ...] = (
    0.0, 0.0052083333, 0.6666666667, 1.0, 0.3333333333, 0.5, 0.1666666667, 0.25,
    -0.0, -0.0052083333, -0.6666666667, -1.0, -0.3333333333, -0.5, -0.1666666667, -0.25,
)  # fmt: skip

BLOCKSIZE = 64  # weights per first-level absmax (paper and bitsandbytes default)
DQ_BLOCKSIZE = 256  # first-level scales per second-level scale

# Fixed runtime cost that no tensor accounts for: the CUDA context and cuBLAS workspace on a GPU,
# the interpreter plus torch/transformers code and allocator slack on a CPU. A round, documented
# guess rather than a fit; `estimate_training_memory` lets callers override it.
DEFAULT_RUNTIME_OVERHEAD_BYTES = 512 * 1024**2

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_OPTIMIZER_STATE_BYTES = {  # bytes of optimizer state per trainable parameter (AdamW: m and v)
    "paged_adamw_32bit": 8.0,
    "adamw_32bit": 8.0,
    "adamw_torch": 8.0,
    # 8-bit blockwise states (blocks of 256 with an fp32 absmax each): 2 * (1 + 4/256)
    "paged_adamw_8bit": 2 * (1 + 4 / 256),
    "adamw_8bit": 2 * (1 + 4 / 256),
}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bits_per_param(
    double_quant: bool,
    blocksize: int = BLOCKSIZE,
    dq_blocksize: int = DQ_BLOCKSIZE,
    scale_bits: int = 32,
    dq_bits: int = 8,
) -> float:
    """Storage cost of one 4-bit weight including its share of the quantization constants.

    # Note: double quantization
    Each block of `blocksize` weights carries one absmax scale. Stored as fp32 it costs
    32/64 = 0.5 bits per weight: 4.5 bits in all. Double quantization (QLoRA section 3)
    quantizes those scales again, to 8 bits in blocks of 256 after subtracting their mean,
    keeping one fp32 scale per 256 first-level scales: 8/64 + 32/(64*256) = 0.127 bits per
    weight, 4.127 in all. The per-tensor extras (the mean offset, the 16-entry and 256-entry
    lookup tables) do not grow with the parameter count and are left out of this figure, as
    in the paper; `measured_footprint` reports them separately.

    Args:
        double_quant: Whether the absmax scales are themselves quantized.
        blocksize: Weights per first-level scale.
        dq_blocksize: First-level scales per second-level scale.
        scale_bits: Bits of an unquantized scale (fp32).
        dq_bits: Bits of a quantized first-level scale.

    Returns:
        Bits per parameter, e.g. 4.5 or 4.126953125.

    Raises:
        ValueError: If a block size or bit width is not positive.
    """
    for name, value in (("blocksize", blocksize), ("dq_blocksize", dq_blocksize),
                        ("scale_bits", scale_bits), ("dq_bits", dq_bits)):  # fmt: skip
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if not double_quant:
        return 4 + scale_bits / blocksize
    return 4 + dq_bits / blocksize + scale_bits / (blocksize * dq_blocksize)


def _nbytes(t: Any) -> int:
    return int(t.numel() * t.element_size()) if t is not None else 0


def measured_footprint(model: Any) -> dict[str, Any]:
    """Count the bytes a loaded model really holds in its 4-bit layers and elsewhere.

    Walks every `bitsandbytes.nn.Linear4bit` and reads its `Params4bit` and `QuantState`:
    packed codes (two per byte), first-level absmax (fp32, or uint8 with double quantization),
    and with double quantization the second-level absmax, the dynamic-map code and the offset.

    See Note: double quantization. `bits_per_param` counts the packed codes, every block scale
    and the per-tensor offset; the lookup tables (`table_bytes`: the NF4/FP4 map and the 8-bit
    dynamic map, which bitsandbytes copies into every layer) are reported apart, and included
    in `bits_per_param_with_tables`.

    Args:
        model: A transformers (or PEFT-wrapped) model loaded with a 4-bit BitsAndBytesConfig.

    Returns:
        Dict with n_quantized_params, n_quantized_layers, weight_bytes, constant_bytes,
        table_bytes, bits_per_param, bits_per_param_with_tables, other_bytes (every other
        parameter and buffer), quant_type and double_quant.

    Raises:
        ValueError: If the model has no 4-bit layers.
    """
    import bitsandbytes as bnb

    n_q = weight_bytes = constant_bytes = table_bytes = n_layers = 0
    quant_types: set[str] = set()
    dq: set[bool] = set()
    quantized_ids: set[int] = set()
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        w = module.weight
        state = w.quant_state
        if state is None:
            raise ValueError(f"4-bit layer {module!r} has no quant_state: was the model moved to a device?")
        quantized_ids.add(id(w))
        n_layers += 1
        n_q += math.prod(state.shape)
        weight_bytes += _nbytes(w)
        constant_bytes += _nbytes(state.absmax)
        table_bytes += _nbytes(state.code)
        quant_types.add(state.quant_type)
        dq.add(state.nested)
        if state.nested:
            constant_bytes += _nbytes(state.state2.absmax) + _nbytes(state.offset)
            table_bytes += _nbytes(state.state2.code)
    if n_layers == 0:
        raise ValueError("model has no bitsandbytes Linear4bit layers; load it with load_quantized_model")
    seen: set[int] = set()
    other_bytes = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in quantized_ids or id(t) in seen:  # tied embeddings count once
            continue
        seen.add(id(t))
        other_bytes += _nbytes(t)
    return {
        "n_quantized_params": n_q,
        "n_quantized_layers": n_layers,
        "weight_bytes": weight_bytes,
        "constant_bytes": constant_bytes,
        "table_bytes": table_bytes,
        "bits_per_param": 8 * (weight_bytes + constant_bytes) / n_q,
        "bits_per_param_with_tables": 8 * (weight_bytes + constant_bytes + table_bytes) / n_q,
        "other_bytes": other_bytes,
        "quant_type": "/".join(sorted(quant_types)),
        "double_quant": all(dq),
    }


def _text_config(config_json: dict) -> dict:
    # Multimodal configs nest the language model; every field we need lives there.
    return config_json.get("text_config") or config_json


def linear_shapes(config_json: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer in one Llama-style decoder block.

    Args:
        config_json: A model's config.json as a dict (Llama, Mistral, Qwen2, SmolLM2 ...).

    Returns:
        Mapping from module name (q_proj ... down_proj) to its shape.

    Raises:
        ValueError: If a required field is missing.
    """
    cfg = _text_config(config_json)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in cfg:
            raise ValueError(f"config.json lacks {key!r}; only Llama-style decoder models are supported")
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim") or h // n_heads
    return {
        "q_proj": (h, n_heads * head_dim),
        "k_proj": (h, n_kv * head_dim),
        "v_proj": (h, n_kv * head_dim),
        "o_proj": (n_heads * head_dim, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def estimate_training_memory(
    config_json: dict,
    seq_len: int,
    batch_size: int,
    lora_r: int,
    gradient_checkpointing: bool,
    double_quant: bool = True,
    optimizer: str = "paged_adamw_32bit",
    compute_dtype: str = "bfloat16",
    target_modules: str | list[str] = "all-linear",
    runtime_overhead_bytes: int = DEFAULT_RUNTIME_OVERHEAD_BYTES,
    checkpoint_fraction: float | None = 1.0,
    fused_layers: bool = True,
    device: str = "cpu",
) -> dict[str, int]:
    """Predict the peak memory of one QLoRA training step from a model's config.

    Terms (P_q quantized weights, L layers, h hidden, i intermediate, kv key/value width,
    V vocab, N = batch_size * seq_len tokens, c = bytes of compute_dtype):
      base        P_q * bits_per_param / 8                      (see Note: double quantization)
      non_quant   (V*h [+ V*h untied lm_head] + (2L+1)*h) * c   embeddings and norms stay 16-bit
      lora        P_lora * 4, P_lora = L * sum_targets r*(in+out)   adapters train in fp32
      gradients   P_lora * 4
      optimizer   P_lora * 8 (AdamW 32-bit m, v) or ~2 bytes (8-bit)
      activations what autograd keeps per token per layer (q = heads*head_dim), with the
                  lean layers of qlora_core.fused (fused_layers, the default):
                  2 RMSNorms: their input, the fp32 residual stream       2*4*h
                  LoRA: the shared inputs of q/k/v and gate/up and the
                  r-wide A outputs (o's input is SDPA's output)           2*c*h + sum_targets c*r
                  q, k, v after RoPE and the output kept by SDPA          c*(2q + 2kv)
                  MLP: gate and up (down's input is remade in backward)   2*i*c
                  and with the stock modules (fused_layers=False):
                  2 RMSNorms: fp32 input and c-byte output each         2*(4h + c*h)
                  LoRA: PEFT casts each adapted layer's input to fp32
                  and keeps the r-wide A output                          sum_targets 4*(in + r)
                  q, k before RoPE; q, k, v after it and the output
                  kept by SDPA                                           c*(3q + 3kv)
                  MLP: gate, up, act(gate), act*up                       4*i*c
                  With gradient checkpointing only each layer's input (residual bytes * h: 4
                  with the fused layers, which sum LoRA updates in fp32, else c) is kept, plus one
                  layer's full set while it is recomputed in backward. Either way, the layer
                  running backward adds about two more sets: the gradients of its activations
                  and the temporaries its forward freed (projections before RoPE, base outputs
                  before the LoRA add).
      logits      N * V * (c + 4 + 4)   logits, their fp32 upcast and log-softmax in the loss
      overhead    runtime_overhead_bytes
    Memory-efficient attention (SDPA flash/efficient kernels) is assumed: no (T, T) matrix.

    Args:
        config_json: The model's config.json as a dict.
        seq_len: Tokens per row.
        batch_size: Rows per micro-batch.
        lora_r: LoRA rank.
        gradient_checkpointing: Whether layers are recomputed in backward.
        checkpoint_fraction: With checkpointing, the fraction of layers that are recomputed; the
            others keep their activations (see qlora_core.models, Note: selective checkpointing).
            None: `auto_checkpoint_fraction`'s choice for `device`.
        double_quant: Whether the 4-bit scales are double-quantized.
        optimizer: One of qlora_core.config.OPTIMIZERS.
        compute_dtype: "bfloat16", "float16" or "float32".
        target_modules: "all-linear" or a list of module names (q_proj ... down_proj).
        runtime_overhead_bytes: Fixed cost added to the total.
        fused_layers: Whether the run uses qlora_core.fused's LoRA/RMSNorm/SwiGLU autograd.
        device: where the run computes ("cpu", "cuda"); only the automatic checkpoint_fraction
            depends on it.

    Returns:
        Dict of byte counts: total_bytes, base_bytes, non_quantized_bytes, lora_bytes,
        gradient_bytes, optimizer_bytes, activation_bytes, logits_bytes, overhead_bytes,
        and n_lora_params.

    Raises:
        ValueError: On a non-positive size, an unknown optimizer or dtype, or a bad config.
    """
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("lora_r", lora_r)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if optimizer not in _OPTIMIZER_STATE_BYTES:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {sorted(_OPTIMIZER_STATE_BYTES)}")
    if compute_dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown compute_dtype {compute_dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    cfg = _text_config(config_json)
    shapes = linear_shapes(config_json)
    targets = list(ALL_LINEAR) if target_modules == "all-linear" else list(target_modules)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown target module(s) {unknown}; expected names from {list(shapes)}")
    n_layers, h, vocab = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    c = _DTYPE_BYTES[compute_dtype]
    tokens = batch_size * seq_len

    n_quant = n_layers * sum(a * b for a, b in shapes.values())
    base = n_quant * bits_per_param(double_quant) / 8
    tied = cfg.get("tie_word_embeddings", True)
    non_quant = (vocab * h * (1 if tied else 2) + (2 * n_layers + 1) * h) * c
    n_lora = n_layers * sum(lora_r * (shapes[t][0] + shapes[t][1]) for t in targets)
    lora = gradients = 4 * n_lora
    opt = _OPTIMIZER_STATE_BYTES[optimizer] * n_lora

    per_token_layer = _activation_bytes_per_token_layer(config_json, lora_r, c, targets, fused_layers)
    if checkpoint_fraction is None:
        checkpoint_fraction = auto_checkpoint_fraction(config_json, lora_r, compute_dtype, target_modules, fused_layers,
                                                       device)  # fmt: skip
    n_checkpointed = round(checkpoint_fraction * n_layers) if gradient_checkpointing else 0
    # A checkpointed layer keeps only its (B, T, h) input, plus one layer's worth while it recomputes.
    activations = tokens * (n_checkpointed * h * residual_bytes(c, fused_layers)
                            + (n_layers - n_checkpointed) * per_token_layer)  # fmt: skip
    if n_checkpointed:
        activations += tokens * per_token_layer
    activations += 2 * tokens * per_token_layer  # the backward workspace of one layer
    logits = tokens * vocab * (c + 4 + 4)
    parts = {
        "base_bytes": int(base),
        "non_quantized_bytes": int(non_quant),
        "lora_bytes": int(lora),
        "gradient_bytes": int(gradients),
        "optimizer_bytes": int(opt),
        "activation_bytes": int(activations),
        "logits_bytes": int(logits),
        "overhead_bytes": int(runtime_overhead_bytes),
    }
    return {"total_bytes": sum(parts.values()), **parts, "n_lora_params": int(n_lora)}


def residual_bytes(c: int, fused_layers: bool) -> int:
    """Bytes per element of the residual stream between blocks: fp32 with the fused layers
    (qlora_core/fused.py, Note: the update summed in fp32), else the compute dtype's."""
    return 4 if fused_layers else c


def _activation_bytes_per_token_layer(
    config_json: dict, lora_r: int, c: int, targets: list[str], fused_layers: bool
) -> int:
    """What autograd keeps per token in one un-checkpointed block (see `estimate_training_memory`)."""
    cfg = _text_config(config_json)
    shapes = linear_shapes(config_json)
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = shapes["q_proj"][1], shapes["k_proj"][1]
    if fused_layers:  # measured on SmolLM2 in bf16 with saved_tensors_hooks: 15.9 (r=8) and 16.7 (r=64) KB/token/layer, as this says
        return (
            2 * residual_bytes(c, fused_layers) * h  # (B, T, h) norm inputs: the fp32 residual stream
            + 2 * c * h + sum(c * lora_r for _ in targets)  # the two normed inputs, (B, T, r) per LoRA
            + c * (2 * q + 2 * kv)  # attention
            + 2 * i * c  # (B, T, i) gate and up
        )
    lora_in = 4 if c != 4 else 0  # PEFT's fp32 input copies exist only when c is not fp32
    return (
        2 * (4 * h + c * h)  # (B, T, h) fp32 + compute-dtype per norm
        + sum(lora_in * shapes[t][0] + 4 * lora_r for t in targets)  # (B, T, in), (B, T, r)
        + c * (3 * q + 3 * kv)  # attention
        + 4 * i * c  # (B, T, i) x 4 in the MLP
    )


def auto_checkpoint_fraction(
    config_json: dict,
    lora_r: int,
    compute_dtype: str = "bfloat16",
    target_modules: str | list[str] = "all-linear",
    fused_layers: bool = True,
    device: str = "cpu",
) -> float:
    """The fraction of decoder layers to checkpoint when the user leaves it to us.

    # Note: memory-neutral checkpointing. The usual QLoRA recipe (transformers' loss) holds the
    # logits of every position, their fp32 copy and the log-softmax: V * (c + 4 + 4) bytes per
    # token. Our loss holds one chunk of supervised rows (qlora_core/loss.py), so that memory is
    # free. We spend three quarters of it, per token, on blocks that skip the checkpoint
    # recompute (each costs its activations minus the input a checkpointed block keeps) and
    # checkpoint the rest. The choice depends only on the model's shape, not on batch or length
    # (both sides scale with tokens), so it is the same for every run of a model: on SmolLM2
    # (V = 49,152, width 576) 4 (r=8) or 5 (r=64) of 30 blocks stay checkpointed; on a Llama-7B
    # shape (V = 32,000, width 4096) 30 of 32. Why three quarters, measured on bench/bench_grid.py
    # (AVX512-BF16 host, bf16): with half (13-14 of 30 checkpointed) our peak RSS was 0.60-0.92x
    # the reference's and the recompute cost ~10 % of a step; with all of it (none checkpointed)
    # 0.66-0.92x on `gsm8k` and `long` but 0.96-1.00x on `short` r=64, whose peak is mostly what
    # does not scale with tokens (the r=64 optimizer state, the process), where ours is closest to
    # the reference's; three quarters gave 0.95-0.96x there and 1.66-1.78x its speed.
    # A head with LoRA on it takes the full-logits path and frees nothing: everything is checkpointed.
    #
    # Note: checkpointing in fp32. Our blocks' activations double in fp32, and the bf16 rule
    # above (then spending half, tuned at a peak 0.80-0.94x the reference's on bench/bench_grid.py),
    # left 19-20 of SmolLM2's 30 blocks checkpointed at 0.35-0.76x the fp32 reference's memory: 1.28-1.53x its
    # speed where 1.5x is the goal. In fp32 the full-logits loss holds four fp32 (N, V) tensors at
    # the start of its backward (logits, log-probs, and the gradients of both), V * 16 per token,
    # and the fp32 reference measured fatter still (its peak grows ~2x faster with tokens than in
    # bf16), so in fp32 we spend all of V * 16: SmolLM2 keeps 0 (r=8) or 2 (r=64) of 30 blocks
    # checkpointed (bench/bench_grid.py on an AVX2 host: see README), a Llama-7B shape 30 of 32.
    #
    # Note: checkpointing on a GPU. The rules above were measured as peak RSS on CPUs. On CUDA
    # (bench/gpu_check.sh on an H200, Llama-7B shape, 2048 tokens, r=64) the 2 of 32 blocks left
    # uncheckpointed put our peak at 6.26 GB allocated against the reference's 5.72 GB (1.09x):
    # the logits memory our loss frees is not part of the reference's CUDA peak. So on a GPU every
    # block is checkpointed, and our chunked loss keeps the peak below the reference's.

    Returns:
        A fraction in [0, 1] of layers to checkpoint, a multiple of 1 / num_hidden_layers.
    """
    cfg = _text_config(config_json)
    targets = list(ALL_LINEAR) if target_modules == "all-linear" else list(target_modules)
    if "lm_head" in targets or device.startswith("cuda"):  # See Note: checkpointing on a GPU
        return 1.0
    c = _DTYPE_BYTES[compute_dtype]
    n_layers, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    if c == 4:  # See Note: checkpointing in fp32
        freed, spent = cfg["vocab_size"] * 16, 1.0  # per token
    else:
        freed, spent = cfg["vocab_size"] * (c + 4 + 4), 0.75
    known = [t for t in targets if t in linear_shapes(config_json)]
    per_layer = _activation_bytes_per_token_layer(config_json, lora_r, c, known, fused_layers) - residual_bytes(c, fused_layers) * h
    n_free = min(n_layers, int(spent * freed // max(per_layer, 1)))
    return (n_layers - n_free) / n_layers
