"""Merging an adapter into a 16-bit base gives the adapter model's logits, without PEFT."""

from __future__ import annotations

import pytest
import torch

from qlora_core.export import load_for_inference, merge_adapter_16bit

IDS = torch.tensor([[1, 17, 42, 99, 150, 7, 3, 250]])  # (1, T)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A non-trivial adapter (random A and B, as after training) saved the PEFT way."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(out))
    return out


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()  # (1, T, V)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 5e-2)])
def test_merged_model_matches_adapter_on_16bit_base(tiny_model_dir, adapter_dir, tmp_path, dtype, tol):
    from transformers import AutoModelForCausalLM

    merged_dir = merge_adapter_16bit(tiny_model_dir, adapter_dir, tmp_path / "merged", dtype=dtype)
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())

    with_adapter, _ = load_for_inference(tiny_model_dir, adapter_dir, quantized=False, compute_dtype=dtype)
    base, _ = load_for_inference(tiny_model_dir, quantized=False, compute_dtype=dtype)
    expected, got, plain = _logits(with_adapter), _logits(merged.to(getattr(torch, dtype))), _logits(base)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert (expected - plain).abs().max() > 10 * tol, "the adapter changes the model"


def test_merging_again_replaces_the_earlier_output_whole(tiny_model_dir, adapter_dir, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an older merge")
    (out / "stale.bin").write_bytes(b"only in the older merge")
    merged_dir = merge_adapter_16bit(tiny_model_dir, adapter_dir, out)
    assert merged_dir == out and not (out / "stale.bin").exists()
    assert (out / "model.safetensors").stat().st_size > 1000 and (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_load_for_inference_quantized(tiny_model_dir, adapter_dir):
    model, tokenizer = load_for_inference(tiny_model_dir, adapter_dir, quantized=True)
    assert not model.training
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert tokenizer.pad_token_id is not None
    assert torch.isfinite(_logits(model)).all()


def test_merge_needs_an_adapter(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge_adapter_16bit(tiny_model_dir, tmp_path, tmp_path / "merged")
