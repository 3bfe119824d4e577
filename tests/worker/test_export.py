"""The merged-export task body (`export_merged_here`) on a real SQLite database, a real model store and
a real LoRA adapter on the tiny random Llama: the archive it leaves is a Hugging Face model directory
that `AutoModelForCausalLM.from_pretrained` loads, answering what the adapter answers on the base
under `PeftModel` in the same dtype (greedy tokens compared in float32, logits in bf16: see below).

The adapter is made with PEFT's `init_lora_weights=False` (random A and B) rather than trained: its
update is large, so a merge that dropped or mangled it could not pass the comparison (checked: the
base alone answers differently). Celery is not involved (tests/e2e runs the real worker process).
"""

from __future__ import annotations

import json
import tarfile
import multiprocessing
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import Engine, insert, select, update

from service.db import Job, Tenant, new_id
from service.settings import Settings
from tests.worker.test_tasks import TINY_ID, env  # noqa: F401 (the fixture)
from worker import export
from worker.export import export_merged_here, merged_dtype

PROMPT = "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n"
MAX_NEW_TOKENS = 16
SEED = 0


def _succeeded_job(settings: Settings, engine: Engine, model: str = TINY_ID) -> str:
    """A succeeded job row whose final adapter is a random-weight LoRA adapter of the tiny base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_core.store import ModelStore

    tenant, job_id = new_id("org"), new_id("ftjob")
    rel = f"jobs/{job_id}/adapter"
    base = AutoModelForCausalLM.from_pretrained(ModelStore(settings.models_dir).model_path(TINY_ID),
                                                dtype=torch.float32)
    torch.manual_seed(SEED)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(Path(settings.artifacts_dir) / rel)
    with engine.begin() as conn:
        conn.execute(insert(Tenant.__table__).values(id=tenant, name=tenant))
        conn.execute(insert(Job.__table__).values(id=job_id, tenant_id=tenant, model=model, training_file="file-x",
                                                  status="succeeded", seed=0, hyperparameters={}, config={},
                                                  adapter_path=rel, fine_tuned_model=f"ft:{TINY_ID}:x::1"))
    return job_id


def _job(engine: Engine, job_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(Job.__table__).where(Job.__table__.c.id == job_id)).one()


def _archive(settings: Settings, job_id: str) -> Path:
    return Path(settings.artifacts_dir) / "jobs" / job_id / "merged.tar.gz"


def _greedy(model: Any, tok: Any) -> list[int]:
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]  # (1, T)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                             min_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def _build_and_load(settings: Settings, engine: Engine, out: Path) -> tuple[Any, Any, Any, str]:
    """Run the task on a fresh job, check the archive's layout, and load it.

    Returns:
        (merged model, its tokenizer, the reference PeftModel on the base in the merged dtype, job id).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_core.store import ModelStore

    job_id = _succeeded_job(settings, engine)
    assert export_merged_here(engine, settings, job_id) == "built"
    state = _job(engine, job_id).merged_export
    archive = _archive(settings, job_id)
    assert state["status"] == "succeeded" and state["error"] is None and state["bytes"] == archive.stat().st_size
    assert sorted(p.name for p in archive.parent.iterdir()) == ["adapter", "merged.tar.gz"]  # no scratch left
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(out, filter="data")
    assert all("/" not in n for n in names)  # the model directory's files at the root
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(names)
    assert not any(n.startswith("adapter_") for n in names)  # merged: no PEFT files

    merged = AutoModelForCausalLM.from_pretrained(out)  # in the dtype its config.json names
    merged.eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(ModelStore(settings.models_dir).model_path(TINY_ID), dtype=merged.dtype)
    reference = PeftModel.from_pretrained(base, str(Path(settings.artifacts_dir) / _job(engine, job_id).adapter_path))
    reference.eval()
    return merged, AutoTokenizer.from_pretrained(out), reference, job_id


# bf16 keeps 8 bits of mantissa: the merged weights (W + s * B @ A rounded once) and the adapter
# applied beside the base (x @ W + s * (x @ A) @ B, each rounded) differ by that rounding; measured
# on this model and prompt, at most 0.009 on logits of magnitude 0.6.
BF16_LOGITS_ATOL = 0.03


def test_the_archive_is_a_bf16_model_close_to_the_adapter_on_the_bf16_base(env, tmp_path: Path) -> None:  # noqa: F811
    """What the task builds for this base (config: bfloat16). Greedy tokens are compared in float32 below:
    on this random model two candidates' logits lie 0.04 apart, and bf16 rounding flips that tie."""
    settings, engine = env
    merged, tok, reference, _ = _build_and_load(settings, engine, tmp_path / "merged")
    assert merged.dtype == torch.bfloat16  # See Note: merged dtype
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]  # (1, T)
    with torch.no_grad():
        got, want = merged(ids).logits.float(), reference(ids).logits.float()  # (1, T, V)
        with reference.disable_adapter():
            base = reference(ids).logits.float()
    torch.testing.assert_close(got, want, atol=BF16_LOGITS_ATOL, rtol=0)
    assert (base - want).abs().max() > 10 * BF16_LOGITS_ATOL  # the adapter matters, so the check can fail


def test_merged_greedy_tokens_equal_the_adapters_in_float32(env, tmp_path: Path,  # noqa: F811
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The same task with the merge in float32, where rounding cannot flip a near tie: token for token."""
    settings, engine = env
    monkeypatch.setattr(export, "merged_dtype", lambda _model_dir: "float32")
    merged, tok, reference, _ = _build_and_load(settings, engine, tmp_path / "merged")
    assert merged.dtype == torch.float32
    expected = _greedy(reference, tok)
    assert _greedy(merged, tok) == expected
    with reference.disable_adapter():  # the adapter matters, so the comparison above can fail
        assert _greedy(reference, tok) != expected


def test_a_duplicate_message_does_nothing(env, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    settings, engine = env
    job_id = _succeeded_job(settings, engine)
    assert export_merged_here(engine, settings, job_id) == "built"
    before = _archive(settings, job_id).stat()

    def never(*_: Any, **__: Any) -> None:
        raise AssertionError("rebuilt an archive that exists")

    monkeypatch.setattr(export, "build_merged_archive", never)
    assert export_merged_here(engine, settings, job_id) == "exists"
    after = _archive(settings, job_id).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def _build_in_child(settings: Settings, job_id: str, results: Any) -> None:
    from service.database import make_engine

    results.put(export_merged_here(make_engine(settings.database_url), settings, job_id))


def test_two_builds_at_once_leave_one_whole_archive(env, tmp_path: Path) -> None:  # noqa: F811
    """Two worker processes given the same job at once (a duplicated message): one whole archive.

    Processes, as the pool runs tasks: transformers' loading is not safe in two threads of one
    process (a meta-device context is global), which no worker does. Spawned, not forked: this
    test process has run torch's thread pools, and a forked child of it can hang in OpenMP (the
    worker forks from a parent that has only imported torch; See Note: preloading torch).
    """
    from transformers import AutoModelForCausalLM

    settings, engine = env
    job_id = _succeeded_job(settings, engine)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(settings, job_id, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert sorted(results.get(timeout=5) for _ in procs) in (["built", "built"], ["built", "exists"])
    archive = _archive(settings, job_id)
    assert sorted(p.name for p in archive.parent.iterdir()) == ["adapter", "merged.tar.gz"]
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "merged", filter="data")
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")


def test_a_failed_build_is_recorded_for_the_api(env) -> None:  # noqa: F811
    settings, engine = env
    job_id = _succeeded_job(settings, engine, model="test/gone-from-the-store")
    assert export_merged_here(engine, settings, job_id) == "failed"
    state = _job(engine, job_id).merged_export
    assert state["status"] == "failed" and state["error"]["code"] == "model_not_found"
    assert "test/gone-from-the-store" in state["error"]["message"]
    assert not _archive(settings, job_id).exists()


def test_a_build_that_keeps_killing_its_worker_gives_up(env, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """A redelivered message after a killed child counts as a start; past MAX_BUILD_STARTS the build fails."""
    settings, engine = env
    job_id = _succeeded_job(settings, engine)

    def killed(*_: Any) -> Path:  # the OOM killer ends the child: the task never returns
        raise SystemExit("killed")

    monkeypatch.setattr(export, "build_merged_archive", killed)
    for _ in range(export.MAX_BUILD_STARTS):
        with pytest.raises(SystemExit):
            export_merged_here(engine, settings, job_id)
    assert export_merged_here(engine, settings, job_id) == "failed"
    state = _job(engine, job_id).merged_export
    assert state["status"] == "failed" and state["error"]["code"] == "worker_lost"
    assert state["build_starts"] == export.MAX_BUILD_STARTS


def test_a_newer_request_is_not_overwritten(env, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """A build that fails after the API made a new request leaves that request in force."""
    settings, engine = env
    job_id = _succeeded_job(settings, engine, model="test/gone-from-the-store")
    newer = {"status": "building", "request_id": "newer", "requested_at": 2, "attempts": 2, "error": None}
    real_build = export.build_merged_archive

    def api_asks_again_meanwhile(*args: Any) -> Path:
        with engine.begin() as conn:
            conn.execute(update(Job.__table__).where(Job.__table__.c.id == job_id).values(merged_export=newer))
        return real_build(*args)

    with engine.begin() as conn:
        conn.execute(update(Job.__table__).where(Job.__table__.c.id == job_id).values(
            merged_export={"status": "building", "request_id": "older", "requested_at": 1, "attempts": 1}))
    monkeypatch.setattr(export, "build_merged_archive", api_asks_again_meanwhile)
    assert export_merged_here(engine, settings, job_id) == "failed"
    assert _job(engine, job_id).merged_export == newer


def test_a_model_deleted_during_the_build_leaves_no_archive(env, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    settings, engine = env
    job_id = _succeeded_job(settings, engine)
    real_build = export.build_merged_archive

    def deleted_meanwhile(*args: Any) -> Path:
        out = real_build(*args)
        with engine.begin() as conn:  # what DELETE /v1/models does to the job row
            conn.execute(update(Job.__table__).where(Job.__table__.c.id == job_id).values(adapter_path=None))
        return out

    monkeypatch.setattr(export, "build_merged_archive", deleted_meanwhile)
    assert export_merged_here(engine, settings, job_id) == "skipped"
    assert not _archive(settings, job_id).exists()


def test_unfinished_or_unknown_jobs_are_skipped(env) -> None:  # noqa: F811
    settings, engine = env
    job_id = _succeeded_job(settings, engine)
    with engine.begin() as conn:
        conn.execute(update(Job.__table__).where(Job.__table__.c.id == job_id).values(status="running"))
    assert export_merged_here(engine, settings, job_id) == "skipped"
    assert export_merged_here(engine, settings, "ftjob-nope") == "skipped"
    assert not _archive(settings, job_id).exists()


@pytest.mark.parametrize(("declared", "expected"), [("float16", "float16"), ("bfloat16", "bfloat16"),
                                                    ("float32", "bfloat16"), (None, "bfloat16")])
def test_merged_dtype_follows_a_float16_base_else_bfloat16(tmp_path: Path, declared: str | None,
                                                           expected: str) -> None:
    config = {"model_type": "llama"} if declared is None else {"model_type": "llama", "torch_dtype": declared}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert merged_dtype(tmp_path) == expected


def test_the_outcome_is_recorded_only_for_the_request_it_answers(engine: Engine) -> None:
    """The guarded UPDATE of `merged_export` (a JSON path on SQLite and PostgreSQL alike)."""
    from tests.worker.conftest import make_job

    job_id = make_job(engine, status="succeeded")

    def state() -> Any:
        return _job(engine, job_id).merged_export

    assert export._record(engine, job_id, {}, status="failed", error=None)  # never requested: NULL matches {}
    assert state()["status"] == "failed"
    asked = {"status": "building", "request_id": "r1", "requested_at": 1, "attempts": 1, "error": None}
    with engine.begin() as conn:
        conn.execute(update(Job.__table__).where(Job.__table__.c.id == job_id).values(merged_export=asked))
    assert not export._record(engine, job_id, {"request_id": "r0"}, status="succeeded")
    assert state() == asked
    assert export._record(engine, job_id, asked, status="succeeded", error=None)
    assert state()["status"] == "succeeded" and state()["request_id"] == "r1" and state()["attempts"] == 1
