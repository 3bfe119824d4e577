"""`qlora models inspect`: what a base model costs in 4-bit and what training it will need.

Loads the model exactly as training does (`qlora_core.models.load_quantized_model`), measures the
4-bit base from the real bitsandbytes tensors (`qlora_core.quant.measured_footprint`, so the
bits-per-parameter figure of QLoRA section 3 is checked rather than assumed) and adds the
training-memory estimate for the requested sequence length, batch size and LoRA rank.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_MIB = 1024**2


def inspect_model(
    model_dir: str | Path,
    double_quant: bool = True,
    quant_type: str = "nf4",
    seq_len: int = 1024,
    batch_size: int = 1,
    lora_r: int = 64,
    gradient_checkpointing: bool = True,
    compute_dtype: str = "auto",
    optimizer: str = "paged_adamw_32bit",
) -> dict[str, Any]:
    """Load a model in 4-bit and report its measured footprint and a training-memory estimate.

    Args:
        model_dir: A store model directory.
        double_quant: Quantize the absmax scales as well.
        quant_type: "nf4" or "fp4".
        seq_len: Tokens per row for the estimate.
        batch_size: Rows per micro-batch for the estimate.
        lora_r: LoRA rank for the estimate.
        gradient_checkpointing: Whether the estimate assumes recomputation in backward.
        compute_dtype: Compute dtype of the 4-bit layers; "auto" (the default, as for jobs) is what
            this machine's device runs natively (qlora_core.device), the dtype a worker here uses.
        optimizer: Optimizer name for the estimate.

    Returns:
        Dict with architecture, n_parameters, n_quantized_params, n_quantized_layers,
        base_4bit_bytes, weight_bytes, constant_bytes, table_bytes, other_bytes,
        bits_per_param, bits_per_param_with_tables, bits_per_param_formula, quant_type,
        double_quant, and `memory` (the estimate_training_memory dict) with its inputs.

    Raises:
        FileNotFoundError: If model_dir has no config.json.
        ValueError: On invalid sizes or quantization options.
    """
    from qlora_core.device import default_device, resolve_compute_dtype
    from qlora_core.models import load_quantized_model
    from qlora_core.quant import bits_per_param, estimate_training_memory, measured_footprint

    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {str(model_dir)!r}")
    config_json = json.loads(config_path.read_text())
    choice = resolve_compute_dtype(compute_dtype, default_device())
    compute_dtype = choice.dtype
    # Validate the estimate's inputs before paying for a model load.
    memory = estimate_training_memory(
        config_json,
        seq_len=seq_len,
        batch_size=batch_size,
        lora_r=lora_r,
        gradient_checkpointing=gradient_checkpointing,
        checkpoint_fraction=None,  # what a run with the defaults checkpoints
        double_quant=double_quant,
        optimizer=optimizer,
        compute_dtype=compute_dtype,
        device=default_device(),
    )
    model = load_quantized_model(model_dir, quant_type=quant_type, double_quant=double_quant,
                                 compute_dtype=compute_dtype, device="cpu")  # fmt: skip
    fp = measured_footprint(model)
    n_other = sum(p.numel() for n, p in model.named_parameters() if p.__class__.__name__ != "Params4bit")
    del model
    return {
        "architecture": (config_json.get("architectures") or ["?"])[0],
        "n_parameters": int(fp["n_quantized_params"] + n_other),
        "n_quantized_params": fp["n_quantized_params"],
        "n_quantized_layers": fp["n_quantized_layers"],
        "base_4bit_bytes": fp["weight_bytes"] + fp["constant_bytes"] + fp["table_bytes"],
        "weight_bytes": fp["weight_bytes"],
        "constant_bytes": fp["constant_bytes"],
        "table_bytes": fp["table_bytes"],
        "other_bytes": fp["other_bytes"],
        "bits_per_param": fp["bits_per_param"],
        "bits_per_param_with_tables": fp["bits_per_param_with_tables"],
        "bits_per_param_formula": bits_per_param(double_quant),
        "quant_type": fp["quant_type"],
        "double_quant": fp["double_quant"],
        "compute_dtype": compute_dtype,
        "compute_dtype_reason": choice.reason,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "lora_r": lora_r,
        "gradient_checkpointing": gradient_checkpointing,
        "optimizer": optimizer,
        "memory": memory,
    }


def _mib(n: float) -> str:
    return f"{n / _MIB:.1f} MiB"


def format_report(model_id: str, report: dict[str, Any]) -> str:
    """Render an inspect_model report as `key=value` lines, readable and grep-able.

    The line `bits_per_param=X.XXX` is the 4-bit weights' cost including every per-block
    quantization constant (see qlora_core.quant, Note: double quantization).
    """
    mem = report["memory"]
    lines = [
        f"model={model_id}",
        f"architecture={report['architecture']}",
        f"n_parameters={report['n_parameters']}",
        f"n_quantized_params={report['n_quantized_params']} ({report['n_quantized_layers']} linear layers)",
        f"quant_type={report['quant_type']} double_quant={str(report['double_quant']).lower()}"
        f" compute_dtype={report['compute_dtype']}",
        f"compute_dtype_reason={report['compute_dtype_reason']}",
        f"base_4bit_bytes={report['base_4bit_bytes']} ({_mib(report['base_4bit_bytes'])}: "
        f"codes {report['weight_bytes']}, scales {report['constant_bytes']}, lookup tables {report['table_bytes']})",
        f"other_bytes={report['other_bytes']} ({_mib(report['other_bytes'])} embeddings, norms, buffers)",
        f"bits_per_param={report['bits_per_param']:.3f}",
        f"bits_per_param_with_tables={report['bits_per_param_with_tables']:.3f}",
        f"bits_per_param_formula={report['bits_per_param_formula']:.3f}",
        f"estimate: seq_len={report['seq_len']} batch_size={report['batch_size']} lora_r={report['lora_r']}"
        f" gradient_checkpointing={str(report['gradient_checkpointing']).lower()} optimizer={report['optimizer']}",
    ]
    for key in ("base_bytes", "non_quantized_bytes", "lora_bytes", "gradient_bytes", "optimizer_bytes",
                "activation_bytes", "logits_bytes", "overhead_bytes"):  # fmt: skip
        lines.append(f"  {key}={mem[key]} ({_mib(mem[key])})")
    lines.append(f"n_lora_params={mem['n_lora_params']}")
    lines.append(f"estimated_training_bytes={mem['total_bytes']} ({_mib(mem['total_bytes'])})")
    return "\n".join(lines)
