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


@pytest.fixture(scope="session")
def s3_server():  # type: ignore[no-untyped-def]
    """moto's S3 server as its own process on a 127.0.0.1 port (tests/faults/services.py, S3Server)."""
    from tests.faults.services import start_s3_server

    server = start_s3_server()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture()
def s3_bucket(s3_server) -> str:  # type: ignore[no-untyped-def]
    """A new, empty bucket on the test S3 server."""
    import secrets

    return s3_server.make_bucket(f"qlora-{secrets.token_hex(4)}")
