"""A base model and its LoRA adapters in the inference server: loading, the LRU, batched LoRA.

Fine-tuned models are adapters on a shared 4-bit base. They load on first use from the artifact
store without touching the base (See Note: adapters loaded after a forward), sit in an LRU cache
bounded by their bytes, and rows of different adapters share one forward through two batched
matmuls per LoRA layer (See Note: batched LoRA). The engine (inference/engine.py) owns the slots
and calls them from its one thread only.
"""

from __future__ import annotations

import logging
import types
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from inference.errors import RequestError

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class BaseSlot:
    """A loaded base model, its tokenizer, and the adapters loaded beside it (LRU by bytes)."""

    def __init__(self, model: Any, tokenizer: Any, context: int, max_adapter_bytes: int) -> None:
        self.model, self.tokenizer, self.context = model, tokenizer, context
        self.peft: Any = None  # a PeftModel once the first adapter loads
        self.adapters: OrderedDict[str, int] = OrderedDict()  # key -> bytes, least recently used first
        self.max_adapter_bytes = max_adapter_bytes
        self.eos = _eos_ids(model, tokenizer)

    @property
    def runner(self) -> Any:
        return self.peft if self.peft is not None else self.model

    def ensure_adapter(self, key: str, path: str, in_use: set[str],
                       resolve: Callable[[str], str] | None = None) -> None:
        """Load adapter `key` from `path` unless loaded; evict least recently used ones over budget.

        `resolve` turns the path the API sent (the adapter's place in the artifact store) into a
        local directory, fetching it from the store when that is S3 (inference/server.py); it is
        only called for an adapter not loaded yet.
        """
        if key in self.adapters:
            self.adapters.move_to_end(key)
            return
        if resolve is not None:
            try:
                path = resolve(path)
            except (FileNotFoundError, ValueError) as e:  # ArtifactMissing, UnsafePath
                log.warning("adapter %s at %s: %s", key, path, e)
                path = ""
        if not path or not (Path(path) / "adapter_config.json").is_file():
            raise RequestError(404, "The model's adapter is no longer available (was the model deleted?).",
                               param="model", code="model_not_found")
        self.peft = load_adapter(self.model, self.peft, key, Path(path))
        self.adapters[key] = _adapter_bytes(self.peft, key)
        log.info("loaded adapter %s (%d bytes) from %s", key, self.adapters[key], path)
        while sum(self.adapters.values()) > self.max_adapter_bytes and len(self.adapters) > 1:
            victim = next((k for k in self.adapters if k not in in_use and k != key), None)
            if victim is None:
                break
            self.drop_adapter(victim)

    def drop_adapter(self, key: str) -> bool:
        if key not in self.adapters:
            return False
        del self.adapters[key]
        if self.adapters:
            self.peft.delete_adapter(key)
            install_batched_lora(self.peft)  # stacks that held it are stale
        else:  # PEFT keeps at least one adapter: unwrap to the bare base instead
            self.model = self.peft.unload()
            self.peft = None
        log.info("evicted adapter %s", key)
        return True


def keep_dense_weights(model: Any, max_bytes: int) -> int:
    """On a CPU without bitsandbytes' fused 4-bit kernel, keep the 4-bit layers dequantized too.

    # Note: dense weights for CPU decoding. bitsandbytes computes a 4-bit layer on a CPU in one of
    # two ways: with AVX512-BF16 it repacks the weight into an inference layout the first time an
    # inference forward uses it and runs a fused kernel (See Note: adapters loaded after a
    # forward); elsewhere (an AVX2-only CPU) every call dequantizes the whole weight into the
    # compute dtype and then runs `F.linear` on it. Decoding calls every layer once per token, so
    # there each token dequantized the whole base again: on SmolLM2 in fp32 on a real AVX2-only
    # AMD EPYC, about a third of a six-row decode step (the profile: `dequantize_4bit` ~100 ms,
    # the matmuls ~145 ms of ~375 ms). Here each such layer's weight is dequantized once, by the
    # same two bitsandbytes ops its forward runs, and the layer's forward becomes that `F.linear`
    # on the kept copy, so its outputs are bitwise what bitsandbytes computes
    # (tests/inference/test_engine.py compares the tokens with `PeftModel.generate`'s). The
    # copy costs (compute dtype bytes) per weight beside the 4-bit one, e.g. 425 MB in fp32 for
    # SmolLM2's 106 M quantized weights, so it is kept only when the whole copy fits `max_bytes`
    # (`QLORA_INFERENCE_DENSE_MAX_BYTES`; 0 turns it off). Training never takes this path.

    Returns:
        The bytes kept (0 when the device has the fused kernel, the copy would not fit, or the
        model has no 4-bit layer this covers).
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.weight.device.type == "cpu"]
    if not layers or max_bytes <= 0 or any(not _dense_covered(m) for m in layers):
        return 0
    need = sum(m.weight.quant_state.shape.numel() * m.compute_dtype.itemsize for m in layers)
    if need > max_bytes:
        log.info("4-bit layers decode from their packed weights: a dense copy needs %d bytes, over "
                 "QLORA_INFERENCE_DENSE_MAX_BYTES=%d", need, max_bytes)
        return 0
    for m in layers:
        dense = _dequantized(m.weight, m.weight.quant_state, m.compute_dtype)
        m.forward = types.MethodType(_dense_forward, m)
        m.dense_weight = dense
    log.info("kept the %d 4-bit layers dequantized for decoding (%d bytes, %s)", len(layers), need,
             layers[0].compute_dtype)
    return need


def _dense_covered(layer: Any) -> bool:
    """Whether bitsandbytes computes this layer as dequantize + `F.linear` (no fused CPU kernel)."""
    qs = getattr(layer.weight, "quant_state", None)
    if qs is None or layer.compute_dtype is None or getattr(layer, "support_avx512bf16_for_cpu", False):
        return False
    if getattr(qs, "packing_format_for_cpu", False) or len(qs.shape) != 2:
        return False
    return not qs.nested or qs.state2.blocksize == 256


def _dequantized(weight: torch.Tensor, qs: Any, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight exactly as bitsandbytes' CPU `gemm_4bit` dequantizes it for an input of `dtype`."""
    absmax = qs.absmax
    if qs.nested:  # the second-level scales first, as gemm_4bit does
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(qs.absmax, qs.state2.absmax, qs.state2.code,
                                                                    256, torch.float32) + qs.offset  # fmt: skip
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight.view(-1, 1), absmax, qs.blocksize, qs.quant_type,
                                                          list(qs.shape), dtype)  # fmt: skip


def _dense_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """`Linear4bit.forward` without autograd, on the kept dense weight (See Note: dense weights for CPU decoding)."""
    if torch.is_grad_enabled() and x.requires_grad:  # never in the server; keep bitsandbytes' autograd path
        return type(self).forward(self, x)
    inp_dtype = x.dtype
    x = x.to(self.dense_weight.dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return torch.nn.functional.linear(x, self.dense_weight, bias).to(inp_dtype)


def load_adapter(model: Any, peft_model: Any, key: str, path: Path) -> Any:
    """Add the saved adapter at `path` as adapter `key`, without reading the base's state dict.

    # Note: adapters loaded after a forward. On a CPU, bitsandbytes repacks each 4-bit weight
    # into its gemv layout the first time an inference forward uses it, and `state_dict()` then
    # unpacks and re-quantizes every layer's scales, moving the base weights by up to ~0.03.
    # PEFT's `from_pretrained` / `load_adapter` read the state dict, so every adapter loaded after
    # the server had answered once changed the base under all adapters (and grew RSS by tens of
    # MB a load). Here PEFT only creates the LoRA modules from the adapter's config
    # (`get_peft_model` / `add_adapter`, which touch no base weight) and the saved tensors are
    # copied into them by name: the result is the model `PeftModel.from_pretrained` builds on a
    # fresh base (fp32 LoRA weights, as its default `autocast_adapter_dtype` makes them).

    Args:
        model: the base model (used when `peft_model` is None).
        peft_model: the PeftModel holding the other adapters, or None.
        key: the adapter's name in the PeftModel.
        path: a directory with `adapter_config.json` and `adapter_model.safetensors`.

    Returns:
        The PeftModel, in eval mode.

    Raises:
        RequestError: 422 when the adapter's tensors do not fit its config.
    """
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(path))
    config.inference_mode = True
    if peft_model is None:
        peft_model = get_peft_model(model, config, adapter_name=key)
    else:
        peft_model.add_adapter(key, config)
    params = {n: p for n, p in peft_model.named_parameters() if f".{key}." in n}
    filled = set()
    for name, tensor in load_file(str(path / "adapter_model.safetensors")).items():
        # saved as "...q_proj.lora_A.weight"; live as "...q_proj.lora_A.<key>.weight"
        head, _, leaf = name.rpartition(".")
        live = f"{head}.{key}.{leaf}"
        if live not in params or params[live].shape != tensor.shape:
            peft_model.delete_adapter(key) if len(peft_model.peft_config) > 1 else None
            raise RequestError(422, f"the adapter's tensor {name} does not fit its adapter_config.json", param="model")
        with torch.no_grad():
            params[live].copy_(tensor.to(params[live].dtype))
        params[live].requires_grad_(False)
        filled.add(live)
    if missing := sorted(set(params) - filled):
        raise RequestError(422, f"the adapter holds no tensor for {missing[0]} ({len(missing)} missing)", param="model")
    peft_model.eval()
    install_batched_lora(peft_model)
    return peft_model


def install_batched_lora(peft_model: Any) -> None:
    """Give every LoRA layer of `peft_model` the batched mixed-adapter forward (`_batched_lora`)
    and drop the stacked weights cached for the old set of adapters."""
    for module in peft_model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "_mixed_batch_forward"):
            if not hasattr(module, "_peft_mixed_batch_forward"):
                module._peft_mixed_batch_forward = module._mixed_batch_forward
                module._mixed_batch_forward = types.MethodType(_batched_lora, module)
            module._lora_stacks = {}


try:
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS as _VARIANT_KWARGS
except ImportError:  # older PEFT: no variant kwargs
    _VARIANT_KWARGS = ()


def _batched_lora(self: Any, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
    """PEFT's mixed-batch LoRA forward as two batched matmuls instead of a loop over adapters.

    # Note: batched LoRA. PEFT's `_mixed_batch_forward` loops in Python over the batch's distinct
    # adapters in every LoRA layer (select rows, two matmuls, scatter back): with 8 adapters in a
    # decode step of SmolLM2 that is 8 x 210 small ops, and the step took 2.5x one adapter's. Here
    # each layer keeps its adapters' A and scaling*B stacked (zero-padded to the largest rank; a
    # zero row adds exactly nothing), picks each row's pair with one index, and applies them with
    # two `bmm`s, Punica's BGMV in plain torch; rows of the base ("__base__") pick a zero pair.
    # The math is PEFT's (fp32 LoRA on the input cast to the adapters' dtype, cast back, added),
    # summed in another order. Variants (DoRA, ...) and dropout take PEFT's own path.
    """
    names = [n for n in dict.fromkeys(adapter_names) if n in self.lora_A]
    if any(n in getattr(self, "lora_variant", {}) or not isinstance(self.lora_dropout[n], torch.nn.Identity)
           for n in names) or torch.is_autocast_enabled():  # fmt: skip
        return self._peft_mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
    for variant_key in _VARIANT_KWARGS:  # only LoRA variants use these; never the base layer
        kwargs.pop(variant_key, None)
    result = self.base_layer(x, *args, **kwargs)  # (B, T, N)
    if not names:
        return result
    key = tuple(names)
    stacks = self._lora_stacks.get(key)
    if stacks is None:
        r = max(self.lora_A[n].weight.shape[0] for n in names)
        first = self.lora_A[names[0]].weight
        a = first.new_zeros((len(names) + 1, r, first.shape[1]))  # (n+1, r, K); slot 0: no adapter
        b = first.new_zeros((len(names) + 1, result.shape[-1], r))  # (n+1, N, r)
        for i, n in enumerate(names, start=1):
            wa, wb = self.lora_A[n].weight, self.lora_B[n].weight
            a[i, : wa.shape[0]] = wa
            b[i, :, : wb.shape[1]] = wb * self.scaling[n]
        stacks = self._lora_stacks[key] = (a, b)
    a, b = stacks
    slot = {n: i for i, n in enumerate(names, start=1)}
    index = torch.tensor([slot.get(n, 0) for n in adapter_names], device=x.device)
    xa = torch.bmm(x.to(a.dtype), a.index_select(0, index).transpose(1, 2))  # (B, T, r)
    delta = torch.bmm(xa, b.index_select(0, index).transpose(1, 2))  # (B, T, N)
    return result + delta.to(result.dtype)


def _adapter_bytes(peft_model: Any, key: str) -> int:
    return sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if f".{key}." in n)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
