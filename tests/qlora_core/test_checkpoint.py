"""Checkpoints on disk: atomic publication, listing, exact reload of adapter and RNG state."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from qlora_core import checkpoint as ckpt


@pytest.fixture()
def lora_model(tiny_model_dir):
    """The tiny Llama in fp32 with a randomly initialised (non-zero) LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, config)


def _lora(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_rng_state_round_trips_through_disk(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(ckpt.capture_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    ckpt.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert again[:2] == expected[:2]
    torch.testing.assert_close(again[2], expected[2], rtol=0, atol=0)


def test_save_publishes_complete_dirs_and_reloads_exactly(lora_model, tmp_path):
    before = _lora(lora_model)
    paths = [ckpt.save_checkpoint(lora_model, tmp_path, step, {"step": step}) for step in (10, 2)]
    assert [p.name for p in paths] == ["step-00000010", "step-00000002"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 10]  # in step order, not write order
    assert ckpt.latest_checkpoint(tmp_path) == paths[0]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000010"]
    assert (paths[0] / "adapter_model.safetensors").stat().st_size > 1000

    with torch.no_grad():
        for _, p in lora_model.named_parameters():
            p.add_(1.0)
    state = ckpt.load_checkpoint(lora_model, paths[0])
    assert state["step"] == 10
    after = _lora(lora_model)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


def test_failed_write_leaves_nothing_behind(lora_model, tmp_path):
    ckpt.save_checkpoint(lora_model, tmp_path, 1, {"step": 1})
    with pytest.raises((AttributeError, pickle.PicklingError)):
        # a lambda cannot be pickled: torch.save fails halfway through the checkpoint
        ckpt.save_checkpoint(lora_model, tmp_path, 2, {"step": 2, "bad": lambda: None})
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]


def test_a_write_refused_at_its_rename_publishes_nothing_and_leaves_no_temp_dir(lora_model, tmp_path):
    """A writer that loses the right to write while its files go to disk (a worker frozen past its
    lease) is asked once more right before the rename, with the files already there, and publishes
    nothing; the checkpoint another writer published at that step stays as it was."""
    kept = ckpt.save_checkpoint(lora_model, tmp_path, 6, {"step": 6, "by": "the new holder"})
    seen: list[list[str]] = []

    def refuse() -> bool:  # yes before the write, no once its files are on disk
        seen.append([p.name for p in (tmp_path / "checkpoints").iterdir()])
        return len(seen) == 1

    assert ckpt.save_checkpoint(lora_model, tmp_path, 6, {"step": 6, "by": "the stale one"}, may_publish=refuse) is None
    assert any(name.startswith(".tmp-step-00000006-") for name in seen[-1])  # asked with its files written
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000006"]
    assert ckpt.read_state(kept)["by"] == "the new holder"
    assert ckpt.save_adapter(lora_model, tmp_path, may_publish=lambda: False) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_incomplete_and_temp_dirs_are_ignored_and_cleaned(lora_model, tmp_path):
    good = ckpt.save_checkpoint(lora_model, tmp_path, 4, {"step": 4})
    (tmp_path / "checkpoints" / "step-00000008").mkdir()  # killed before COMPLETE
    (tmp_path / "checkpoints" / ".tmp-step-00000012-999").mkdir()  # killed mid-write
    assert ckpt.latest_checkpoint(tmp_path) == good
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.read_state(tmp_path / "checkpoints" / "step-00000008")
    assert ckpt.remove_stale_temp_dirs(tmp_path) == 1
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000012-999").exists()
    assert ckpt.latest_checkpoint(tmp_path / "nowhere") is None


def test_final_adapter_loads_with_peft(lora_model, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = ckpt.save_adapter(lora_model, tmp_path)
    assert adapter == tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.tensor([[1, 5, 9, 14, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, lora_model.eval()(ids).logits, rtol=0, atol=0)
