"""The generation engine of the inference server: one 4-bit base, many LoRA adapters, one batch.

Each base model is loaded once, quantized as training quantized it (NF4 + double quantization,
the device's native compute dtype), with its tokenizer; fine-tuned models are its adapters,
loaded on first use from the artifact store into the same LoRA modules `PeftModel.from_pretrained`
builds, and kept in an LRU cache bounded by their bytes (inference/adapters.py).

# Note: continuous batching of mixed adapters. One engine thread owns every model and runs one
# loop: admit waiting requests (their prompts are prefilled together, left-padded, into a KV cache
# of their own), merge them into the running batch (caches left-padded to a common length and
# stacked, an attention mask marking the padding), then decode one token for every running row in
# a single forward. Rows of different adapters share that forward through PEFT's mixed-adapter
# batches (`adapter_names`, "__base__" for the bare base), which each LoRA layer computes as two
# batched matmuls (inference/adapters.py, Note: batched LoRA): each row gets its own adapter.
# Finished rows leave the batch at once (their cache rows dropped by index), and padding columns
# no row needs any more are cropped, so a long request does not hold a short
# one's finished slot. The idea is Orca's iteration-level scheduling and S-LoRA's/Punica's
# heterogeneous adapter batches, on plain PyTorch and the transformers KV cache.
#
# Greedy decoding of a request alone runs exactly the forwards `PeftModel.generate` runs (prefill
# of the prompt, then one token at a time on the cache, last-position logits only), so its tokens
# equal what the downloaded adapter gives (tests/inference/test_engine.py); in a batch, rows are
# padded and computed in larger matmuls, equal up to the compute dtype's rounding.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from inference.adapters import BASE_ADAPTER, BaseSlot, keep_dense_weights
from inference.errors import RequestError
from qlora_core.generate import render_prompt

__all__ = ["BASE_ADAPTER", "Engine", "GenerationRequest", "RequestError"]

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    """One request as the API forwards it (see inference/app.py for the wire format)."""

    base_model_id: str
    prompts: list[Any]  # strings, or one chat message list
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    adapter_key: str | None = None
    adapter_path: str | None = None
    # called from the engine thread: ("accepted", prompt_tokens) | ("token", (choice, text)) |
    # ("done", (choice, finish_reason, completion_tokens)) | ("error", RequestError) | ("end", None)
    emit: Callable[[str, Any], None] = lambda kind, value: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    pending_rows: int = 0  # choices still decoding (engine thread only)


@dataclass
class _Row:
    """One choice being generated: a row of the running batch."""

    request: GenerationRequest
    choice: int
    adapter: str
    prompt_len: int
    max_new: int
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (See Note: incremental detokenization)
    prefix: int = 0  # ids[prefix:read] decoded into the end of `text` last time
    read: int = 0
    sent: int = 0  # characters of `text` already emitted
    position: int = 0  # the position id of the next token fed



class Engine:
    """Owns the models and the engine thread; `submit` is safe from any thread."""

    def __init__(self, resolve_base: Callable[[str], Path], device: str | None = None,
                 max_batch: int = 16, max_adapter_bytes: int = 1 << 30, compute_dtype: str = "auto",
                 resolve_adapter: Callable[[str], str] | None = None, dense_max_bytes: int = 2 << 30) -> None:  # fmt: skip
        """
        Args:
            resolve_base: base model id -> its store directory (raises KeyError when unknown).
            resolve_adapter: an adapter's path as the API sends it -> a local directory (None: use it as is).
            device: torch device (default: CUDA when visible, else CPU).
            max_batch: rows (choices) decoded together at most.
            max_adapter_bytes: the LRU budget for the adapters of one base.
            compute_dtype: "auto" (the device's native dtype, as training's default) or a dtype name.
            dense_max_bytes: on a CPU without bitsandbytes' fused 4-bit kernel, keep a base's 4-bit
                layers dequantized too when that copy fits (inference/adapters.py, Note: dense
                weights for CPU decoding); 0: never.
        """
        from qlora_core.device import default_device

        self.resolve_base = resolve_base
        self.resolve_adapter = resolve_adapter
        self.device = device or default_device()
        self.max_batch = max_batch
        self.max_adapter_bytes = max_adapter_bytes
        self.compute_dtype = compute_dtype
        self.dense_max_bytes = dense_max_bytes
        self.bases: dict[str, BaseSlot] = {}
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="inference-engine", daemon=True)
        self._stopping = False
        self.steps = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def submit(self, request: GenerationRequest) -> None:
        self._inbox.put(("generate", request))

    def evict(self, key: str, done: Callable[[bool], None]) -> None:
        """Drop adapter `key` from every base (a deleted model); `done(found)` runs on the engine thread."""
        self._inbox.put(("evict", (key, done)))

    def stats(self) -> dict[str, Any]:
        return {"device": self.device, "bases": {b: list(s.adapters) for b, s in list(self.bases.items())}}

    # ---- the engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        running: dict[str, _Batch] = {}  # base id -> its running batch
        waiting: list[tuple[str, list[_Row]]] = []
        while not self._stopping:
            busy = any(b.rows for b in running.values())
            try:
                item = self._inbox.get(block=not busy and not waiting, timeout=None)
            except queue.Empty:
                item = "idle"
            while item is not None and item != "idle":
                self._handle(item, waiting, running)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = "idle"
            if item is None:
                break
            try:
                self._admit(waiting, running)
            except Exception as e:  # noqa: BLE001 - reported to every caller it concerns, then go on
                self._fail(running, waiting, e)
                continue
            for base_id, batch in list(running.items()):
                if batch.rows:
                    try:
                        self._step(self.bases[base_id], batch)
                    except Exception as e:  # noqa: BLE001
                        self._fail({base_id: batch}, [], e)
                    self.steps += 1

    def _fail(self, running: dict, waiting: list, exc: Exception) -> None:
        """A forward failed (out of memory, a bug): its requests get an error, the engine goes on."""
        log.exception("generation failed: %s", exc)
        error = RequestError(500, f"generation failed on the inference server: {type(exc).__name__}: {exc}")
        requests = {id(r.request): r.request for b in running.values() for r in b.rows}
        requests.update({id(r.request): r.request for _, rows in waiting for r in rows})
        for request in requests.values():
            request.emit("error", error)
        for batch in running.values():
            batch.rows, batch.cache, batch.mask = [], None, None
        waiting.clear()

    def _handle(self, item: tuple[str, Any], waiting: list, running: dict) -> None:
        kind, value = item
        if kind == "evict":
            key, done = value
            in_use = {r.adapter for b in running.values() for r in b.rows}
            found = False
            for slot in self.bases.values():
                if key in in_use:  # rows still decoding with it finish first; then it goes
                    for batch in running.values():
                        batch.evict_after.add(key)
                    found = True
                else:
                    found = slot.drop_adapter(key) or found
            done(found)
            return
        request: GenerationRequest = value
        try:
            rows = self._prepare(request, running)
        except RequestError as e:
            request.emit("error", e)
            return
        except Exception as e:  # a model that fails to load is a server fault, reported to its caller
            log.exception("request failed before generation")
            request.emit("error", RequestError(500, f"the inference server failed to prepare the request: {e}"))
            return
        waiting.append((request.base_model_id, rows))

    def _slot(self, base_id: str) -> BaseSlot:
        slot = self.bases.get(base_id)
        if slot is None:
            from qlora_core.device import resolve_compute_dtype
            from qlora_core.models import load_quantized_model, load_tokenizer

            try:
                path = self.resolve_base(base_id)
            except KeyError:
                raise RequestError(404, f"The model `{base_id}` does not exist or you do not have access to it.",
                                   param="model", code="model_not_found") from None
            dtype = resolve_compute_dtype(self.compute_dtype, self.device).dtype
            t0 = time.monotonic()
            model = load_quantized_model(path, compute_dtype=dtype, device=self.device)
            model.eval()
            keep_dense_weights(model, self.dense_max_bytes)
            tokenizer = load_tokenizer(path)
            context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
            slot = BaseSlot(model, tokenizer, context, self.max_adapter_bytes)
            self.bases[base_id] = slot
            log.info("loaded base %s (%s, %s) in %.1f s", base_id, self.device, dtype, time.monotonic() - t0)
        return slot

    def _prepare(self, request: GenerationRequest, running: dict) -> list[_Row]:
        slot = self._slot(request.base_model_id)
        tok = slot.tokenizer
        encoded = []
        for i, prompt in enumerate(request.prompts):
            try:
                text, special = render_prompt(tok, prompt)
            except ValueError as e:
                raise RequestError(400, f"{e}; use /v1/completions with a plain prompt", param="messages") from None
            encoded.append(tok(text, add_special_tokens=special)["input_ids"])
        longest = max(len(ids) for ids in encoded)
        if any(len(ids) == 0 for ids in encoded):
            raise RequestError(400, "The prompt is empty.", param="prompt")
        if longest >= slot.context:
            raise RequestError(400, f"This model's maximum context length is {slot.context} tokens. However, your "
                               f"prompt is {longest} tokens.", param="messages", code="context_length_exceeded")
        room = slot.context - longest
        if request.max_tokens is not None and request.max_tokens > room:
            raise RequestError(400, f"This model's maximum context length is {slot.context} tokens. However, you "
                               f"requested {longest + request.max_tokens} tokens ({longest} in the prompt, "
                               f"{request.max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                               param="max_tokens", code="context_length_exceeded")
        adapter = BASE_ADAPTER
        if request.adapter_key is not None:
            in_use = {r.adapter for b in running.values() for r in b.rows}
            slot.ensure_adapter(request.adapter_key, request.adapter_path or "", in_use, self.resolve_adapter)
            adapter = request.adapter_key
        request.emit("accepted", sum(len(ids) for ids in encoded))
        rows = []
        choice = 0
        for ids in encoded:
            for _ in range(request.n):
                gen = None
                if request.temperature > 0:
                    gen = torch.Generator(device="cpu")
                    gen.manual_seed(request.seed + choice if request.seed is not None else int.from_bytes(os.urandom(7), "little"))
                max_new = request.max_tokens if request.max_tokens is not None else slot.context - len(ids)
                row = _Row(request, choice, adapter, len(ids), max_new, gen)
                row.ids = list(ids)  # the prompt, until prefill moves it out
                rows.append(row)
                choice += 1
        return rows

    def _admit(self, waiting: list, running: dict) -> None:
        still = []
        for base_id, rows in waiting:
            batch = running.setdefault(base_id, _Batch())
            rows = [r for r in rows if not r.request.cancelled.is_set()]
            if not rows:
                continue
            if len(batch.rows) + len(rows) > self.max_batch and batch.rows:
                still.append((base_id, rows))
                continue
            self._prefill(self.bases[base_id], batch, rows)
        waiting[:] = still

    def _forward(self, slot: BaseSlot, rows: list[_Row], **inputs: Any) -> tuple[torch.Tensor, Any]:
        """One forward of `rows`: (last-position logits (B, V) in fp32, the updated KV cache).

        Rows of one adapter take PEFT's plain path (the adapter set active), which is what
        `PeftModel.generate` runs and ~25 % faster per step than the mixed-batch path, whose
        per-layer loop over the batch's adapters is paid only when adapters really mix.
        """
        kwargs: dict[str, Any] = {}
        adapters = {r.adapter for r in rows}
        if slot.peft is not None and (len(adapters) > 1 or BASE_ADAPTER in adapters):
            kwargs["adapter_names"] = [r.adapter for r in rows]
        elif slot.peft is not None:
            (adapter,) = adapters
            if slot.peft.active_adapter != adapter:
                slot.peft.set_adapter(adapter)
        with torch.no_grad():
            out = slot.runner(**inputs, use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1, :].float(), out.past_key_values  # (B, V)

    def _prefill(self, slot: BaseSlot, batch: "_Batch", rows: list[_Row]) -> None:
        from transformers import DynamicCache

        pad = slot.tokenizer.pad_token_id or 0
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every prompt ends at the last column
            ids[i, width - len(r.ids):] = torch.tensor(r.ids)
            mask[i, width - len(r.ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        dev = slot.model.device
        logits, cache = self._forward(slot, rows, input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                      position_ids=positions.to(dev), past_key_values=DynamicCache())  # fmt: skip
        for r in rows:
            r.position = r.prompt_len
            r.ids = []
        batch.merge(rows, cache, mask.to(dev))
        self._sample_and_emit(slot, batch, rows, logits)

    def _step(self, slot: BaseSlot, batch: "_Batch") -> None:
        rows = batch.rows
        dev = slot.model.device
        ids = torch.tensor([[r.ids[-1]] for r in rows], device=dev)  # (B, 1)
        batch.mask = torch.cat([batch.mask, torch.ones((len(rows), 1), dtype=batch.mask.dtype, device=dev)], 1)
        positions = torch.tensor([[r.position] for r in rows], device=dev)  # (B, 1)
        for r in rows:
            r.position += 1
        logits, batch.cache = self._forward(slot, rows, input_ids=ids, attention_mask=batch.mask,
                                            position_ids=positions, past_key_values=batch.cache)  # fmt: skip
        self._sample_and_emit(slot, batch, rows, logits)

    def _sample_and_emit(self, slot: BaseSlot, batch: "_Batch", rows: list[_Row], logits: torch.Tensor) -> None:
        finished: set[int] = set()
        for i, r in enumerate(rows):
            token = _sample(logits[i], r.request.temperature, r.request.top_p, r.generator)
            r.ids.append(token)
            reason = None
            if token in slot.eos:
                r.ids.pop()
                reason = "stop"
            elif len(r.ids) >= r.max_new:
                reason = "length"
            _detokenize(slot.tokenizer, r)
            text = r.text
            cut = _find_stop(text, r.request.stop)
            if cut is not None:
                text, reason = text[:cut], "stop"
            if r.request.cancelled.is_set():
                reason = reason or "cancelled"
            elif reason is None:
                # hold back a possible partial stop string (an unfinished UTF-8 sequence never
                # reaches `text`: See Note: incremental detokenization)
                safe = len(text) - max((len(s) - 1 for s in r.request.stop), default=0)
                if safe > r.sent:
                    r.request.emit("token", (r.choice, text[r.sent:safe]))
                    r.sent = safe
            if reason is not None:
                if reason != "cancelled" and len(text) > r.sent:
                    r.request.emit("token", (r.choice, text[r.sent:]))
                r.request.emit("done", (r.choice, reason, len(r.ids) + (1 if token in slot.eos else 0), list(r.ids)))
                finished.add(id(r))
        if finished:
            done_rows = [r for r in rows if id(r) in finished]
            batch.remove(finished)
            for r in done_rows:
                r.request.pending_rows -= 1
                if r.request.pending_rows == 0:
                    r.request.emit("end", None)
            for key in list(batch.evict_after):
                if all(r.adapter != key for r in batch.rows):
                    slot.drop_adapter(key)
                    batch.evict_after.discard(key)


class _Batch:
    """The running rows of one base and their shared, left-padded KV cache."""

    def __init__(self) -> None:
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (B, T) 1 where a cache column holds a real token
        self.evict_after: set[str] = set()

    def merge(self, rows: list[_Row], cache: Any, mask: torch.Tensor) -> None:
        for r in rows:
            r.request.pending_rows += 1
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)], 0)
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, width, dim=-2), _left_pad(new.keys, width, dim=-2)], 0)
            old.values = torch.cat([_left_pad(old.values, width, dim=-2), _left_pad(new.values, width, dim=-2)], 0)
        self.rows.extend(rows)

    def remove(self, finished: set[int]) -> None:
        keep = [i for i, r in enumerate(self.rows) if id(r) not in finished]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        used = int((self.mask.sum(0) > 0).nonzero()[0])  # the first column any remaining row needs
        self.mask = self.mask[:, used:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, used:]
            layer.values = layer.values.index_select(0, index)[:, :, used:]


def _left_pad(t: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else nucleus sampling with the row's own generator."""
    if temperature <= 0 or generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, -1)  # (V,)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _detokenize(tokenizer: Any, row: _Row) -> None:
    """Extend `row.text` with its newest tokens.

    # Note: incremental detokenization. Decoding a row's whole output every step costs O(n) per
    # token. As transformers' TextStreamer and vLLM do, decode only a short window: the tokens
    # since the last emitted boundary (`prefix`) with and without the newest ones; the text they
    # add is the suffix of the longer decoding (a window keeps word-initial spaces right), held
    # back while it ends in an unfinished UTF-8 sequence (U+FFFD).
    """
    before = tokenizer.decode(row.ids[row.prefix:row.read], skip_special_tokens=True)
    after = tokenizer.decode(row.ids[row.prefix:], skip_special_tokens=True)
    if len(after) > len(before) and not after.endswith("\ufffd"):
        row.text += after[len(before):]
        row.prefix, row.read = row.read, len(row.ids)


def _find_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None
