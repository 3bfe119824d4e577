"""Shared fixtures: a tiny random Llama directory, and the bundled SmolLM2 from a model store.

Every process that loads models must stay offline (REFERENCES: a hub lookup that cannot connect
wastes time before it fails), so the environment is set here before anything imports transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide random Llama with the tiny ChatML tokenizer (built once per session)."""
    from qlora_core.testing import build_tiny_llama_dir

    return build_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama") / "model", seed=0)


@pytest.fixture(scope="session")
def bundled_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled SmolLM2-135M-Instruct as a safetensors directory.

    Uses the model store under $QLORA_DATA_DIR when set (where `make setup` already imported it),
    otherwise imports the GGUF once into a session temp store (about 15-30 s).
    """
    from qlora_core.store import BUNDLED_MODEL_ID, ModelStore

    data_dir = os.environ.get("QLORA_DATA_DIR")
    root = Path(data_dir) / "models" if data_dir else tmp_path_factory.mktemp("store") / "models"
    store = ModelStore(root)
    store.ensure_bundled()
    return store.model_path(BUNDLED_MODEL_ID)
