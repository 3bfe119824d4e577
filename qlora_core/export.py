"""Export a trained adapter: merged into a 16-bit base, or loaded for inference.

Merging LoRA into a 4-bit base is the QLoRA repository's classic trap: `merge_and_unload` on a
`Linear4bit` dequantizes, adds `B @ A * alpha/r`, and *re-quantizes*, so the merged weights lose the
update below NF4's resolution and outputs drift (PEFT maintainers: merge into a 16-bit copy of the
base instead). So `merge_adapter_16bit` loads the base in bf16, applies the adapter there and saves
an ordinary 16-bit checkpoint that any transformers-based server can load without PEFT.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from qlora_core.fsutil import replace_dir

logger = logging.getLogger(__name__)


def _load_16bit_base(model_dir: str | Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, low_cpu_mem_usage=True)


def merge_adapter_16bit(
    model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16"
) -> Path:
    """Merge a LoRA adapter into a 16-bit copy of its base and save it with the tokenizer.

    Args:
        model_dir: the base model dir the adapter was trained on.
        adapter_dir: a dir with `adapter_config.json` and `adapter_model.safetensors`.
        out_dir: where the merged model goes; written via a temp dir and renamed, so it is
            either complete or absent.
        dtype: "bfloat16" or "float16" (float32 also works, at twice the size).

    Returns:
        `out_dir`, loadable with `AutoModelForCausalLM.from_pretrained`.

    Raises:
        FileNotFoundError: if `adapter_dir` holds no adapter.
    """
    from peft import PeftModel

    from qlora_core.models import load_tokenizer, resolve_dtype

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter_config.json in {adapter_dir}")
    base = _load_16bit_base(model_dir, resolve_dtype(dtype))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        load_tokenizer(model_dir).save_pretrained(str(tmp))
        replace_dir(tmp, out_dir, out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("merged %s into a %s copy of %s at %s", adapter_dir, dtype, model_dir, out_dir)
    return out_dir


def load_for_inference(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    quantized: bool = True,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "auto",
):
    """Load a base model (4-bit as trained, or 16-bit) with an optional adapter, in eval mode.

    Args:
        model_dir: the base model dir.
        adapter_dir: optional adapter dir from a run (`output_dir/adapter` or a checkpoint).
        quantized: load the base as QLoRA trained it (4-bit); False loads it in `compute_dtype`.
        quant_type, double_quant, compute_dtype: as in `TrainConfig`; "auto" is the device's native
            dtype (qlora_core.device), as training chose it on this device.

    Returns:
        `(model, tokenizer)`.
    """
    from peft import PeftModel

    from qlora_core.models import load_quantized_model, load_tokenizer, resolve_dtype

    from qlora_core.device import default_device, resolve_compute_dtype

    compute_dtype = resolve_compute_dtype(compute_dtype, default_device()).dtype
    tokenizer = load_tokenizer(model_dir)
    if quantized:
        model = load_quantized_model(
            model_dir, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype
        )
    else:
        model = _load_16bit_base(model_dir, resolve_dtype(compute_dtype))
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer
