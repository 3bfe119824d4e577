"""Atomic, resumable training checkpoints and the final adapter on disk.

Layout (the service lists these; see CONTRACT "checkpoints"):

    output_dir/checkpoints/step-00000010/
        adapter_config.json, adapter_model.safetensors   # PEFT `save_pretrained` of the adapter
        state.pt                                          # optimizer, scheduler, RNG, data position, metrics
        COMPLETE                                          # written last; a dir without it is ignored
    output_dir/adapter/                                   # the final adapter, only on completion

A checkpoint is built in a hidden temp dir next to its final place, every file fsynced, then renamed
into place and the parent fsynced (the classic write-temp-then-rename recipe): a process killed at
any instant leaves either a complete checkpoint or a temp dir that `latest_checkpoint` ignores.
A caller that may lose the right to write while it writes (a worker whose lease can be taken over)
passes `may_publish`, asked before the write and again after the files are on disk, right before
the rename: when it says no, the temp dir is removed and nothing is published.
This answers the QLoRA repository's most frequent complaints, "resume from checkpoint" and
"empty adapter files": we refuse to publish an adapter file that holds no LoRA tensors.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from qlora_core.fsutil import replace_dir

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
COMPLETE = "COMPLETE"
STATE_FILE = "state.pt"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint or adapter could not be written or read back."""


def checkpoint_name(step: int) -> str:
    """`step-00000010` for step 10: zero-padded so names sort in step order."""
    return f"step-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every complete checkpoint of a run as `(step, path)`, oldest first; temp dirs are skipped."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint dir of a run, or None if it has none."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_stale_temp_dirs(output_dir: str | Path) -> int:
    """Delete temp dirs left by a process that died mid-write; returns how many were removed."""
    n = 0
    for parent in (Path(output_dir) / CHECKPOINTS, Path(output_dir)):
        if parent.is_dir():
            for child in parent.iterdir():
                if child.name.startswith(_TMP_PREFIX) and child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                    n += 1
    return n


def _fsync_tree(path: Path) -> None:
    for child in sorted(path.iterdir()):
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_and_publish(final: Path, write: Callable[[Path], None], may_publish: Callable[[], bool] | None) -> bool:
    """Build `final` in a temp dir beside it with `write(tmp)`, fsync it, rename it into place
    (replacing an older copy) and fsync the parent; a failure removes the temp dir.

    `may_publish` is asked before the temp dir is made and again once the files are on disk, right
    before the rename: when it says no, nothing is published, no temp dir is left and this returns
    False.
    """
    if may_publish is not None and not may_publish():
        return False
    tmp = final.with_name(f"{_TMP_PREFIX}{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        _fsync_tree(tmp)
        if may_publish is not None and not may_publish():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        # An existing `final` is only met when re-running from an older checkpoint; the new copy is authoritative.
        replace_dir(tmp, final, final.with_name(f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    return True


def _name_the_served_base(directory: Path) -> None:
    """Make `base_model_name_or_path` the base's model id, not the store directory PEFT wrote.

    The id is what the service (and vLLM's `--enable-lora`, whose loader checks it) serves the
    base as; a server-local path means nothing to whoever downloads the adapter. PEFT's loader
    ignores the field when it is given the base model, as every loader here is.
    """
    import json

    from qlora_core.store import MANIFEST

    config_path = directory / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    base = config.get("base_model_name_or_path")
    manifest = Path(base) / MANIFEST if base else None
    if manifest is None or not manifest.is_file():
        return
    model_id = json.loads(manifest.read_text()).get("id")
    if model_id:
        config["base_model_name_or_path"] = model_id
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_adapter_files(model: torch.nn.Module, directory: Path) -> None:
    """PEFT `save_pretrained`, then check the weights file really holds the LoRA tensors."""
    from safetensors import safe_open

    model.save_pretrained(str(directory), safe_serialization=True)
    _name_the_served_base(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file() or not (directory / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"save_pretrained wrote no {ADAPTER_WEIGHTS}/{ADAPTER_CONFIG} in {directory}")
    with safe_open(str(weights), framework="pt") as fh:
        n_lora = sum(1 for key in fh.keys() if "lora_" in key)
    expected = sum(1 for name, p in model.named_parameters() if p.requires_grad and "lora_" in name)
    if n_lora == 0 or n_lora < expected:
        raise CheckpointError(f"{weights} holds {n_lora} LoRA tensors, expected {expected} (empty adapter)")


def save_checkpoint(model: torch.nn.Module, output_dir: str | Path, step: int, state: dict[str, Any],
                    may_publish: Callable[[], bool] | None = None) -> Path | None:
    """Write `output_dir/checkpoints/step-XXXXXXXX` atomically.

    Args:
        model: the PEFT model; only its adapter is saved.
        output_dir: the run's output dir.
        step: the optimizer step just completed.
        state: everything else needed to resume (see `train.py`); saved with `torch.save`.
        may_publish: asked before the write and again right before the rename; when it returns
            False nothing is published.

    Returns:
        The final checkpoint dir, or None when `may_publish` refused (the temp dir is gone).

    Raises:
        CheckpointError: if the adapter file would be empty.
    """
    final = Path(output_dir) / CHECKPOINTS / checkpoint_name(step)

    def write(tmp: Path) -> None:
        _save_adapter_files(model, tmp)
        torch.save(state, tmp / STATE_FILE)
        (tmp / COMPLETE).write_text(f"{step}\n")

    if not _write_and_publish(final, write, may_publish):
        logger.info("checkpoint %s not published: no longer allowed to write", final)
        return None
    logger.info("checkpoint %s written", final)
    return final


def save_adapter(model: torch.nn.Module, output_dir: str | Path,
                 may_publish: Callable[[], bool] | None = None) -> Path | None:
    """Write the final adapter to `output_dir/adapter` atomically and return that path, or None
    (nothing published, no temp dir left) when `may_publish`, asked before the write and right
    before the rename, refuses."""
    final = Path(output_dir) / ADAPTER
    return final if _write_and_publish(final, lambda tmp: _save_adapter_files(model, tmp), may_publish) else None


def read_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The `state.pt` of a complete checkpoint (tensors on CPU).

    Raises:
        CheckpointError: if the dir is incomplete.
    """
    path = Path(checkpoint_dir)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker)")
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def load_adapter_weights(model: torch.nn.Module, checkpoint_dir: str | Path) -> None:
    """Copy a checkpoint's (or final adapter's) LoRA tensors into a PEFT model, in place.

    Raises:
        CheckpointError: if the file lacks some of the model's LoRA tensors.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(checkpoint_dir)
    result = set_peft_model_state_dict(model, load_file(str(path / ADAPTER_WEIGHTS)))
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks adapter tensors, e.g. {missing[:3]}")


def load_checkpoint(model: torch.nn.Module, checkpoint_dir: str | Path) -> dict[str, Any]:
    """Load a checkpoint's adapter into `model` and return its state (`read_state`)."""
    state = read_state(checkpoint_dir)
    load_adapter_weights(model, checkpoint_dir)
    return state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states, in a `weights_only`-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """`random.setstate` needs tuples all the way down; a round-trip may hand back lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
