"""Will this job fit on a worker? A torch-free peak-memory estimate checked at job creation.

Before a job is queued the API predicts its peak training memory with
`qlora_core.quant.estimate_training_memory` (the QLoRA paper's accounting, section 3: 4-bit base,
16-bit embeddings, fp32 adapters with their gradients and optimizer state, activations and
logits) from the base model's `config.json` and the job's resolved TrainConfig, records it in
`Job.estimated_memory_bytes`, and compares it with each *live* worker's device (rows in `workers`
that heart-beat recently; workers write them, see worker/main.py), computing in the dtype that
worker would really use (`compute_dtype: "auto"` is bf16 on one device and fp32 on another) and with
the checkpointing the engine chooses there (every block on a GPU, fewer on a CPU). A job that
fits nowhere is refused at once with 400 `insufficient_device_memory` instead of failing with an
out-of-memory error an hour later in the queue. With no live worker on record the job is accepted
(the estimate is still recorded): a worker may start later, and it checks again.

The bundled model may not be imported into the store yet (the worker registers it on first use;
importing needs torch), so its shape is then read from the GGUF header (qlora_core/ggufmeta.py,
no numpy or torch).
"""

from __future__ import annotations

import json
import logging
import time
from functools import lru_cache
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.errors import APIError
from qlora_core.ggufmeta import read_header
from qlora_core.quant import estimate_training_memory
from qlora_core.store import BUNDLED_MODEL_ID, find_bundled_gguf
from service.db import Worker
from service.objectstore import Storage, get_storage
from service.settings import Settings
from service.storage import ArtifactMissing, UnsafePath

log = logging.getLogger(__name__)

GIB = 1024**3


@lru_cache(maxsize=4)
def _gguf_config(path: str, mtime: float) -> dict[str, Any]:
    """A config.json-like dict from a GGUF file's metadata (mtime is part of the cache key)."""
    header = read_header(path)  # the header alone: ~0.1 s, where gguf.GGUFReader took 6 s

    def field(key: str) -> Any:
        return header.fields.get(key)

    arch = field("general.architecture") or "llama"
    vocab = field(f"{arch}.vocab_size") or header.array_lengths["tokenizer.ggml.tokens"]
    cfg = {
        "hidden_size": field(f"{arch}.embedding_length"),
        "intermediate_size": field(f"{arch}.feed_forward_length"),
        "num_hidden_layers": field(f"{arch}.block_count"),
        "num_attention_heads": field(f"{arch}.attention.head_count"),
        "num_key_value_heads": field(f"{arch}.attention.head_count_kv"),
        "vocab_size": vocab,
        # A GGUF of a model with tied embeddings has no separate output matrix.
        "tie_word_embeddings": "output.weight" not in header.tensors,
    }
    return {k: v for k, v in cfg.items() if v is not None}


def model_config_json(storage: Storage, model_id: str) -> dict[str, Any] | None:
    """The base model's config.json as a dict, or None when it cannot be read without torch.

    Args:
        storage: the store (service/objectstore.py) whose `models` area holds the model.
        model_id: a base model id, e.g. "HuggingFaceTB/SmolLM2-135M-Instruct".
    """
    path = f"{model_id.replace('/', '--')}/config.json"
    try:
        return json.loads(storage.read_bytes("models", path))
    except (ArtifactMissing, UnsafePath):
        pass
    except (OSError, ValueError) as e:
        log.warning("unreadable %s: %s", path, e)
        return None
    if model_id == BUNDLED_MODEL_ID:
        try:
            gguf_path = find_bundled_gguf()
            return _gguf_config(str(gguf_path), gguf_path.stat().st_mtime)
        except (OSError, KeyError, ValueError) as e:
            log.warning("cannot read the bundled model's shape: %s", e)
    return None


def estimate_job_memory(config_json: dict[str, Any], cfg: dict[str, Any], native_dtype: str | None = None,
                        device: str = "cpu") -> dict[str, int]:
    """Peak training memory of a job, by term (see `estimate_training_memory`).

    Args:
        config_json: the base model's config.json.
        cfg: the job's resolved `TrainConfig.to_dict()`.
        native_dtype: what `compute_dtype: "auto"` becomes on the worker in question (its report);
            None (unknown) counts as float32, the widest, so the estimate is never too small.
        device: that worker's device kind, "cpu" or "cuda": the engine's automatic checkpointing
            differs (every block on a GPU), so the estimate follows it.

    Raises:
        ValueError: a config the estimator does not understand.
    """
    return estimate_training_memory(
        config_json,
        seq_len=int(cfg["max_seq_length"]),
        # A DPO micro-batch of b pairs is 2b rows, chosen and rejected (qlora_core/dpo.py).
        batch_size=int(cfg["batch_size"]) * (2 if cfg.get("method") == "dpo" else 1),
        lora_r=int(cfg["lora_r"]),
        gradient_checkpointing=bool(cfg["gradient_checkpointing"]),
        checkpoint_fraction=cfg.get("checkpoint_fraction"),  # None: the engine's automatic choice
        fused_layers=bool(cfg.get("fused_layers", True)),
        double_quant=bool(cfg["double_quant"]),
        optimizer=str(cfg["optimizer"]),
        compute_dtype=job_compute_dtype(cfg, native_dtype),
        target_modules=cfg["target_modules"],
        device=device,
    )


def device_kind(reported: str | None) -> str:
    """"cuda" or "cpu" from a worker's reported device ("cuda:0 (NVIDIA H200)", "cpu (8 cores)")."""
    return "cuda" if reported and reported.startswith("cuda") else "cpu"


def job_compute_dtype(cfg: dict[str, Any], native_dtype: str | None) -> str:
    """The dtype a job computes in on a worker whose native dtype is `native_dtype`."""
    requested = str(cfg.get("compute_dtype", "auto"))
    return (native_dtype or "float32") if requested == "auto" else requested


def live_workers(session: Session, settings: Settings, at: int | None = None) -> list[Worker]:
    """The live workers, most device memory first (empty when none has reported).

    Live means `alive` and heard from within max(3 heartbeats, the lease): the same rule the
    reconciler uses to mark workers dead (worker/reconcile.py).
    """
    t = int(time.time()) if at is None else at
    since = t - max(3 * settings.heartbeat_s, settings.lease_s)
    return list(session.scalars(
        select(Worker).where(Worker.alive.is_(True), Worker.last_seen_at >= since)
        .order_by(Worker.device_memory_bytes.desc(), func.length(Worker.id))))  # fmt: skip


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _what_to_lower(est: dict[str, int], cfg: dict[str, Any], hp_param: str) -> str:
    """The one setting that would save the most, named as the request's param."""
    activations = est["activation_bytes"] + est["logits_bytes"]
    trainable = est["lora_bytes"] + est["gradient_bytes"] + est["optimizer_bytes"]
    base = est["base_bytes"] + est["non_quantized_bytes"]
    if base >= activations and base >= trainable:
        return "model"
    if trainable > activations:
        return "qlora.lora_r"
    if not cfg["gradient_checkpointing"]:
        return "qlora.gradient_checkpointing"
    return f"{hp_param}.batch_size" if int(cfg["batch_size"]) > 1 else "qlora.max_seq_length"


def check_fit(session: Session, settings: Settings, model_id: str, cfg: dict[str, Any],
              hp_param: str = "hyperparameters") -> int | None:
    """Estimate a job's peak memory and refuse it when no live worker's device can hold it.

    Args:
        session: database session (reads `workers`).
        settings: service settings (models_dir, heartbeat_s, lease_s).
        model_id: the job's base model.
        cfg: the resolved TrainConfig dict.
        hp_param: where the client put its hyperparameters, to name `batch_size` in `param`.

    Returns:
        The estimate in bytes, to record on the job; None when the model's shape is unknown.

    Raises:
        APIError: 400 `insufficient_device_memory` when workers have reported and none fits.
    """
    config_json = model_config_json(get_storage(settings), model_id)
    if config_json is None:
        return None
    workers = live_workers(session, settings)
    estimates: dict[tuple[str, str], dict[str, int]] = {}  # by the dtype the job would compute in, and the device kind
    try:
        # Each worker with the dtype it would really use (compute_dtype "auto" differs per device)
        # and its device kind (so is the automatic checkpointing).
        for w in workers or [None]:
            native = w.compute_dtype if w is not None else None
            key = (job_compute_dtype(cfg, native), device_kind(w.device if w is not None else None))
            if key not in estimates:
                estimates[key] = estimate_job_memory(config_json, cfg, native, key[1])
            if w is None or estimates[key]["total_bytes"] <= w.device_memory_bytes:
                return estimates[key]["total_bytes"]
    except (KeyError, TypeError, ValueError) as e:  # an odd architecture: the worker will find out
        log.warning("no memory estimate for %s: %s", model_id, e)
        return None
    worker = workers[0]
    dtype = job_compute_dtype(cfg, worker.compute_dtype)
    est = estimates[(dtype, device_kind(worker.device))]
    total = est["total_bytes"]
    trainable = est["lora_bytes"] + est["gradient_bytes"] + est["optimizer_bytes"]
    other = est["non_quantized_bytes"] + est["overhead_bytes"]
    raise APIError(
        400,
        f"This job needs about {_gib(total)} (4-bit base {_gib(est['base_bytes'])}, activations "
        f"{_gib(est['activation_bytes'])}, logits {_gib(est['logits_bytes'])}, adapters with gradients and "
        f"optimizer state {_gib(trainable)}, embeddings and runtime {_gib(other)}); the largest worker device "
        f"({worker.device}, computing in {dtype}) has "
        f"{_gib(worker.device_memory_bytes)}. Lower batch_size, max_seq_length or lora_r, "
        "or enable gradient_checkpointing.",
        param=_what_to_lower(est, cfg, hp_param),
        code="insufficient_device_memory",
    )
