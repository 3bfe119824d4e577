"""DPO on the engine, on a tiny random Llama: the loss and rewards are DPO's, preferences are learned,
a resume is exact and reuses the reference log-probs, and a fine-tuned adapter can be continued."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from qlora_core import dpo
from qlora_core.checkpoint import latest_checkpoint, read_state
from qlora_core.config import TrainConfig
from qlora_core.models import load_tokenizer
from qlora_core.train import TrainingError, train
from qlora_core.validate import DatasetError
from tests.qlora_core.test_train import Recorder, _one_thread  # noqa: F401  (fixture)

SEED = 99


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def preference_rows(n: int, offset: int = 0) -> list[dict]:
    """Pairs whose preferred reply always has the same form ("Answer: N."), the other not."""
    rows = []
    for i in range(offset, offset + n):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append({"input": {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}]},
                     "preferred_output": [{"role": "assistant", "content": f"Answer: {a + b}."}],
                     "non_preferred_output": [{"role": "assistant", "content": f"well maybe it is {a + b + 1} or so"}]})
    return rows


@pytest.fixture(scope="module")
def pref_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pref")
    return _write_jsonl(root / "train.jsonl", preference_rows(16)), _write_jsonl(root / "valid.jsonl", preference_rows(6, 40))


def _config(**overrides) -> TrainConfig:
    base = dict(method="dpo", dpo_beta=0.1, lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=5e-3,
                batch_size=2, gradient_accumulation_steps=2, n_epochs=1, max_seq_length=64, warmup_ratio=0.0,
                seed=SEED, compute_dtype="float32")
    base.update(overrides)
    return TrainConfig(**base)


def test_pairs_tokenize_as_two_rows_supervised_on_the_reply_only(tiny_model_dir: Path, pref_files) -> None:
    tok = load_tokenizer(tiny_model_dir)
    rows, stats = dpo.tokenize_pairs(tok, pref_files[0], 64)
    assert len(rows) == 32 and stats.n_examples == 16
    chosen, rejected = rows[0], rows[1]
    # The prompt is the same tokens in both rows; only the replies are supervised.
    first_sup = next(i for i, label in enumerate(chosen.labels) if label != -100)
    assert chosen.input_ids[:first_sup] == rejected.input_ids[:first_sup]
    assert "Answer: 3." in tok.decode([t for t in chosen.labels if t != -100])
    assert "well maybe" in tok.decode([t for t in rejected.labels if t != -100])
    assert "What is" not in tok.decode([t for t in chosen.labels if t != -100])


def test_a_supervised_file_is_refused_for_dpo_and_a_preference_file_for_sft(tiny_model_dir, pref_files, tmp_path):
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                                 {"role": "assistant", "content": "a"}]}] * 4)
    with pytest.raises(DatasetError, match="line 1.*preference"):
        train(tiny_model_dir, chat, tmp_path / "a", _config())
    with pytest.raises(TrainingError, match="method 'dpo'"):
        train(tiny_model_dir, pref_files[0], tmp_path / "b", _config(method="supervised"))


def test_dpo_loss_is_the_sigmoid_loss_of_the_margins() -> None:
    policy = torch.tensor([-3.0, -5.0, -4.0, -2.0])  # pairs (chosen, rejected)
    reference = torch.tensor([[-3.5, -4.5], [-4.0, -2.5]])
    stats = dpo.dpo_loss(policy, reference, beta=0.5)
    z = torch.tensor([0.5 * ((-3.0 + 3.5) - (-5.0 + 4.5)), 0.5 * ((-4.0 + 4.0) - (-2.0 + 2.5))])
    assert torch.allclose(stats.loss_sum, -F.logsigmoid(z).sum())
    assert stats.n_right == 1 and stats.n_pairs == 2
    assert math.isclose(stats.chosen_sum, 0.5 * 0.5 + 0.0) and math.isclose(stats.rejected_sum, 0.5 * -0.5 + 0.5 * 0.5)


def test_sequence_logps_match_full_logits(tiny_model_dir: Path, pref_files) -> None:
    """The supervised-position projection gives each row's summed log-prob as the full logits do."""
    from qlora_core.models import add_lora, load_quantized_model

    tok = load_tokenizer(tiny_model_dir)
    rows, _ = dpo.tokenize_pairs(tok, pref_files[0], 64)
    model = add_lora(load_quantized_model(tiny_model_dir, device="cpu", compute_dtype="float32"), 8, 16, 0.0,
                     gradient_checkpointing=False)
    batch = dpo.collate_pairs(rows, [0, 1, 2], tok.pad_token_id)
    got = dpo.sequence_logps(model, batch)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    want = (logp * (target != -100)).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_dpo_learns_the_preference_and_reports_rewards(tiny_model_dir: Path, pref_files, tmp_path: Path) -> None:
    train_file, valid_file = pref_files
    cb = Recorder()
    result = train(tiny_model_dir, train_file, tmp_path / "out", _config(n_epochs=4, learning_rate=1e-2),
                   valid_file=valid_file, callback=cb)
    assert result.status == "completed" and result.total_steps == 16
    first, last = cb.metrics[0][1], cb.metrics[-1][1]
    for key in ("train_loss", *dpo.REWARD_KEYS, "valid_loss", "valid_rewards/accuracies", "full_valid_loss",
                "full_valid_rewards/margins"):
        assert key in last, key
    assert "train_mean_token_accuracy" not in last
    # Before any update the policy is the reference: every reward is 0 and the loss log(2).
    assert math.isclose(first["train_loss"], math.log(2), rel_tol=1e-3) and abs(first["rewards/margins"]) < 1e-3
    assert last["train_loss"] < 0.5 * math.log(2)
    assert last["rewards/margins"] > 0 and last["rewards/accuracies"] == 1.0
    assert last["full_valid_rewards/accuracies"] >= 5 / 6  # held-out pairs of the same preference
    assert any("reference log-probs of 22 pairs" in m for _, m in cb.messages)
    # Both rows of every pair count as trained tokens.
    tok = load_tokenizer(tiny_model_dir)
    rows, _ = dpo.tokenize_pairs(tok, train_file, 64)
    assert result.trained_tokens == 4 * sum(len(r.input_ids) for r in rows)


def test_dpo_resume_is_exact_and_reuses_the_reference(tiny_model_dir: Path, pref_files, tmp_path: Path) -> None:
    train_file, valid_file = pref_files
    config = _config(n_epochs=2, lora_dropout=0.1, checkpoint_steps=2, batch_size=2, gradient_accumulation_steps=3)
    straight = train(tiny_model_dir, train_file, tmp_path / "a", config, valid_file=valid_file)
    stopped = train(tiny_model_dir, train_file, tmp_path / "b", config, valid_file=valid_file,
                    callback=Recorder(stop_at=3))
    assert stopped.status == "stopped"
    saved = read_state(latest_checkpoint(tmp_path / "b"))
    assert saved["reference"]["train"].shape == (16, 2) and saved["reference"]["valid"].shape == (6, 2)
    cb = Recorder()
    resumed = train(tiny_model_dir, train_file, tmp_path / "b", config, valid_file=valid_file, callback=cb)
    assert cb.start["resumed_from_step"] == 2
    assert not any("reference log-probs" in m for _, m in cb.messages)  # kept, not recomputed
    a, b = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    assert resumed.trained_tokens == straight.trained_tokens


def test_dpo_continues_a_fine_tuned_adapter_as_its_reference(tiny_model_dir: Path, pref_files, tmp_path: Path) -> None:
    train_file, _ = pref_files
    first = train(tiny_model_dir, train_file, tmp_path / "first", _config(n_epochs=2, learning_rate=1e-2))
    cb = Recorder()
    second = train(tiny_model_dir, train_file, tmp_path / "second", _config(n_epochs=1), callback=cb,
                   init_adapter=first.adapter_dir)
    assert second.status == "completed"
    assert any("fine-tuned model" in m for _, m in cb.messages)
    # The reference is the fine-tuned model: before the first update its rewards are 0, though the
    # adapter is far from the base (a base reference would give large margins at once).
    first_step = cb.metrics[0][1]
    assert abs(first_step["rewards/margins"]) < 0.05 and math.isclose(first_step["train_loss"], math.log(2), rel_tol=0.05)
