"""inference/engine.py: a fine-tuned model answers as its downloaded adapter does, in and out of batches."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from inference.engine import Engine, GenerationRequest, RequestError
from qlora_core.device import native_dtype
from qlora_core.models import add_lora, load_quantized_model, load_tokenizer

PROMPT = [{"role": "user", "content": "hello there, how are you"}]


def _make_adapter(model_dir: Path, out: Path, seed: int, r: int = 8) -> Path:
    """A LoRA adapter with non-zero B (a trained one, as far as generation can tell), saved as PEFT does."""
    torch.manual_seed(seed)
    model = add_lora(load_quantized_model(model_dir, device="cpu"), r, 16, 0.0, gradient_checkpointing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5, generator=g)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [_make_adapter(tiny_model_dir, root / f"a{i}", seed=i, r=(8, 16, 8)[i]) for i in range(3)]


@pytest.fixture()
def engine(tiny_model_dir: Path):
    def resolve(model_id: str) -> Path:
        if model_id != "tiny":
            raise KeyError(model_id)
        return tiny_model_dir

    eng = Engine(resolve, device="cpu", max_batch=8, max_adapter_bytes=1 << 30)
    eng.start()
    yield eng
    eng.stop()


def _run(engine: Engine, **kw) -> dict:
    """Submit one request and wait for it: {"events": [...], "ids": {choice: ids}, "text": {choice: str}}."""
    out: dict = {"events": [], "ids": {}, "text": {}, "reason": {}}
    finished = threading.Event()

    def emit(kind, value):
        out["events"].append((kind, value))
        if kind == "token":
            out["text"][value[0]] = out["text"].get(value[0], "") + value[1]
        elif kind == "done":
            out["reason"][value[0]], out["ids"][value[0]] = value[1], value[3]
        if kind in ("end", "error"):
            finished.set()

    engine.submit(GenerationRequest(base_model_id="tiny", emit=emit, **kw))
    assert finished.wait(120), out["events"][-3:]
    return out


def _peft_greedy(model_dir: Path, adapter: Path | None, n_new: int) -> list[int]:
    """What a user writes by hand: PeftModel.from_pretrained on the same 4-bit base, greedy generate."""
    from peft import PeftModel

    base = load_quantized_model(model_dir, compute_dtype=native_dtype("cpu").dtype, device="cpu")
    model = PeftModel.from_pretrained(base, str(adapter)) if adapter else base
    model.eval()
    tok = load_tokenizer(model_dir)
    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=True)  # fmt: skip
    new = out[0, ids.shape[1]:].tolist()
    return [t for t in new if t != tok.eos_token_id]


@pytest.mark.parametrize("which", [None, 0])
def test_greedy_tokens_equal_peft_from_pretrained(tiny_model_dir: Path, adapters: list[Path], engine: Engine, which) -> None:
    adapter = adapters[which] if which is not None else None
    want = _peft_greedy(tiny_model_dir, adapter, 16)
    kw = {"adapter_key": f"a{which}", "adapter_path": str(adapter)} if adapter else {}
    got = _run(engine, prompts=[PROMPT], max_tokens=16, temperature=0.0, **kw)
    assert got["ids"][0] == want
    assert got["reason"][0] in ("stop", "length")


def test_mixed_adapters_in_one_batch_answer_as_alone(adapters: list[Path], tiny_model_dir: Path) -> None:
    """Concurrent requests for different adapters share decode steps, each row with its own adapter.

    In fp32: a padded batch computes in other matmul shapes, and in bf16 that rounding alone can
    flip a near-tie of this random model's greedy choice some tokens in.
    """
    engine = Engine(lambda _id: tiny_model_dir, device="cpu", compute_dtype="float32")
    engine.start()
    alone = [_run(engine, prompts=[PROMPT], max_tokens=12, temperature=0.0, adapter_key=f"a{i}",
                  adapter_path=str(a))["ids"][0] for i, a in enumerate(adapters)]  # fmt: skip
    assert len({tuple(x) for x in alone}) > 1  # the adapters really differ
    results: list = [None] * 3
    steps_before = engine.steps
    threads = [threading.Thread(target=lambda i=i, a=a: results.__setitem__(i, _run(
        engine, prompts=[PROMPT], max_tokens=12, temperature=0.0, adapter_key=f"a{i}", adapter_path=str(a))))
        for i, a in enumerate(adapters)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # shared steps: fewer decode steps than the three requests alone would take
    assert engine.steps - steps_before < sum(len(x) for x in alone)
    engine.stop()
    assert [r["ids"][0] for r in results] == alone


def test_sampling_is_reproducible_with_a_seed_and_n_gives_n_choices(engine: Engine) -> None:
    a = _run(engine, prompts=[PROMPT], max_tokens=8, temperature=1.0, seed=7, n=2)
    b = _run(engine, prompts=[PROMPT], max_tokens=8, temperature=1.0, seed=7, n=2)
    assert a["ids"] == b["ids"] and sorted(a["ids"]) == [0, 1]


def test_stop_string_ends_the_choice_before_it(engine: Engine) -> None:
    free = _run(engine, prompts=["once upon a time"], max_tokens=12, temperature=0.0)
    text = free["text"][0]
    assert len(text) > 3
    stop = text[2:4]
    got = _run(engine, prompts=["once upon a time"], max_tokens=12, temperature=0.0, stop=[stop])
    assert got["text"].get(0, "") == text[: text.find(stop)]
    assert got["reason"][0] == "stop"


def test_refusals(engine: Engine, tmp_path: Path) -> None:
    errors = {}
    for name, kw in {
        "unknown base": dict(base_model_id="nope"),
        "too long": dict(max_tokens=10**6),
        "missing adapter": dict(adapter_key="gone", adapter_path=str(tmp_path / "gone")),
    }.items():
        out = {"e": None}
        done = threading.Event()

        def emit(kind, value, out=out, done=done):
            if kind == "error":
                out["e"] = value
            if kind in ("error", "end"):
                done.set()

        engine.submit(GenerationRequest(**{"base_model_id": "tiny", "prompts": [PROMPT], "emit": emit, **kw}))
        assert done.wait(60)
        errors[name] = out["e"]
    assert all(isinstance(e, RequestError) for e in errors.values()), errors
    assert {k: e.status for k, e in errors.items()} == {"unknown base": 404, "too long": 400, "missing adapter": 404}
    assert errors["too long"].code == "context_length_exceeded"


def test_lru_keeps_adapters_within_the_budget_and_evict_drops_one(tiny_model_dir: Path, adapters: list[Path]) -> None:
    sizes = []
    eng = Engine(lambda _id: tiny_model_dir, device="cpu", max_adapter_bytes=1)  # room for one at a time
    eng.start()
    try:
        for i, a in enumerate(adapters):
            _run(eng, prompts=[PROMPT], max_tokens=2, temperature=0.0, adapter_key=f"a{i}", adapter_path=str(a))
            sizes.append(list(eng.bases["tiny"].adapters))
        assert sizes == [["a0"], ["a1"], ["a2"]]
        found = threading.Event()
        eng.evict("a2", lambda ok: found.set() if ok else None)
        assert found.wait(30)
        assert eng.bases["tiny"].adapters == {} and eng.bases["tiny"].peft is None
        again = _run(eng, prompts=[PROMPT], max_tokens=2, temperature=0.0, adapter_key="a2", adapter_path=str(adapters[2]))
        assert again["reason"]
    finally:
        eng.stop()


def test_a_failing_forward_fails_its_requests_and_the_engine_goes_on(engine: Engine, monkeypatch) -> None:
    """An error inside generation (out of memory, say) reaches the caller; later requests still work."""
    real = Engine._forward

    def broken(self, *args, **kwargs):
        raise RuntimeError("simulated allocator failure")

    monkeypatch.setattr(Engine, "_forward", broken)
    failed = {"e": None}
    done = threading.Event()

    def emit(kind, value):
        if kind == "error":
            failed["e"] = value
            done.set()

    engine.submit(GenerationRequest(base_model_id="tiny", prompts=[PROMPT], max_tokens=4, emit=emit))
    assert done.wait(60)
    assert failed["e"].status == 500 and "simulated allocator failure" in failed["e"].message
    monkeypatch.setattr(Engine, "_forward", real)
    assert _run(engine, prompts=[PROMPT], max_tokens=3, temperature=0.0)["reason"][0] in ("stop", "length")


def test_an_adapter_loaded_after_the_base_ran_still_answers_as_peft(tiny_model_dir: Path, adapters: list[Path],
                                                                    engine: Engine) -> None:
    """Loading an adapter must not touch the base: on a CPU, bitsandbytes repacks 4-bit weights on
    their first forward, and PEFT's loader reads the model's state dict, which unpacks and
    re-quantizes every layer (moving the weights). The engine's loader copies the adapter tensors
    into the LoRA modules instead."""
    _run(engine, prompts=[PROMPT], max_tokens=4, temperature=0.0)  # the base runs first
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    slot = engine.bases["tiny"]
    with torch.no_grad():
        before = slot.model(input_ids=ids).logits
    for i in (1, 2):
        want = _peft_greedy(tiny_model_dir, adapters[i], 16)
        got = _run(engine, prompts=[PROMPT], max_tokens=16, temperature=0.0, adapter_key=f"a{i}",
                   adapter_path=str(adapters[i]))  # fmt: skip
        assert got["ids"][0] == want, i
    with torch.no_grad(), slot.peft.disable_adapter():
        assert torch.equal(slot.peft(input_ids=ids).logits, before)  # the base did not move


def test_an_adapter_in_the_s3_store_is_fetched_on_first_use(tiny_model_dir: Path, adapters: list[Path],
                                                            tmp_path: Path, s3_server, s3_bucket) -> None:
    """With QLORA_STORAGE_URL=s3://..., the API sends the adapter's place in the store and the
    inference server (its own host, its own disk) fetches it: the answer is the downloaded adapter's."""
    import shutil

    from service.objectstore import get_storage
    from service.settings import Settings

    def host(name: str):  # type: ignore[no-untyped-def]
        return get_storage(Settings(data_dir=tmp_path / name, storage_url=f"s3://{s3_bucket}/x",
                                    s3_endpoint_url=s3_server.url))

    worker, server = host("worker"), host("inference")
    rel = "jobs/ftjob-1/adapter"
    shutil.copytree(adapters[0], worker.local_path("artifacts", rel))
    worker.publish_tree("artifacts", rel)
    fetched: list[str] = []

    def resolve_adapter(path: str) -> str:
        fetched.append(path)
        return str(server.fetch_tree("artifacts", path))

    eng = Engine(lambda _: tiny_model_dir, device="cpu", max_batch=8, max_adapter_bytes=1 << 30,
                 resolve_adapter=resolve_adapter)
    eng.start()
    try:
        want = _peft_greedy(tiny_model_dir, adapters[0], 8)
        for _ in range(2):  # the second request finds it loaded: no second fetch
            got = _run(eng, prompts=[PROMPT], max_tokens=8, temperature=0.0, adapter_key="ftjob-1", adapter_path=rel)
            assert got["ids"][0] == want
        assert fetched == [rel]
        gone = _run(eng, prompts=[PROMPT], max_tokens=2, adapter_key="ftjob-2", adapter_path="jobs/ftjob-2/adapter")
        assert gone["events"][-1][0] == "error" and gone["events"][-1][1].status == 404
    finally:
        eng.stop()


def test_dense_weights_decode_bitwise_as_the_4bit_layers(tiny_model_dir: Path) -> None:
    """Where bitsandbytes has no fused CPU kernel, the kept dense copy changes speed, not one bit of the logits."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    from inference.adapters import keep_dense_weights

    model = load_quantized_model(tiny_model_dir, compute_dtype=native_dtype("cpu").dtype, device="cpu").eval()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    need = sum(m.weight.quant_state.shape.numel() for m in layers) * layers[0].compute_dtype.itemsize
    assert keep_dense_weights(model, need - 1) == 0  # over the budget: left as it was
    assert all("forward" not in vars(m) for m in layers)
    kept = keep_dense_weights(model, need)
    assert kept == (0 if has_avx512bf16() else need)  # with AVX512-BF16 bitsandbytes runs its own fused kernel
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.equal(got, want)
