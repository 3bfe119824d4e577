"""The inference server against a hand-written PEFT loop: one stream, 8 streams on 8 adapters, memory.

1. Eight distinct LoRA adapters of the bundled SmolLM2-135M-Instruct (r=16, alpha 32, every linear
   layer of the blocks; A as PEFT initialises it, B a seeded normal of std 0.02 instead of zeros, so
   each adapter answers differently but still in sentences), saved with PEFT's `save_pretrained`.
2. `qlora infer` (inference/server.py) as an owned child on a free port, QLORA_DATA_DIR the data dir.
   All generation is at temperature 0, `max_tokens` 64, on the same chat prompt (a story, which
   runs past 64 tokens), streamed with `include_usage` (token counts come from the usage chunk,
   never from counting chunks), in this order:
   * a first request on adapter 0 loads the base and that adapter; VmRSS from /proc/<pid>/status;
   * one short request on each of the other seven adapters loads them; VmRSS again (so the
     adapters' memory is measured apart from any batch's activations);
   * one stream on adapter 0, `--rounds` times: time to first token (first non-empty content
     chunk; the role chunk comes before prefill) and completion tokens / request latency (median);
   * 8 concurrent streams (threads released by one barrier), one per adapter, `--rounds` times:
     aggregate completion tokens / wall time (median over rounds), p50/p99 of the per-request
     latency pooled over rounds (linear interpolation, as numpy's default; with 8 x rounds samples
     p99 is close to the slowest request).
   The adapters stay loaded (the server's LRU), so the timed phases load none.
3. The anchor, what a user writes by hand, in its own process (peak RSS from `os.wait4`): the base
   loaded once in 4-bit as the QLoRA repository does (bench.common.load_reference_base) in the
   dtype the server uses (`native_dtype("cpu")`), then for each of the 8 requests in turn
   `PeftModel.from_pretrained(base, adapter)` + `generate(max_new_tokens=64, do_sample=False)` +
   `unload()` (a fresh PeftModel each time, the base restored). Its tokens/s counts adapter
   loading, as a user's loop pays it; its loading and generate seconds are shown apart. No warm-up:
   the first request is a fresh process's first generate, as a user's (a fraction of a second
   here when the machine is idle).

# Note: adapters loaded after a forward (the anchor's). On an AVX512-BF16 CPU, bitsandbytes repacks
# every Linear4bit weight for its CPU kernel on the first eval forward, and PEFT's adapter loading
# reads the state dict, which unpacks it again and re-quantizes the absmax. So in the anchor's loop
# every adapter loaded after the first `unload()` sits on a base moved ~0.15 % away from a fresh
# process's, and its greedy text may part from a fresh process's some tokens in (the round trip
# also costs ~35-50 MB of RSS per load). The server does not do this (inference/adapters.py, Note:
# adapters loaded after a forward: it copies the adapter tensors in), so its one stream, on
# adapter 0, equals the anchor's first, fresh-base answer; its 8 streams are one batch, computed
# in other matmul shapes, and in bf16 that rounding alone can part a greedy text too.

Targets (the issue): 8 adapters cost <= 1.3x the memory of one (server VmRSS, 8 loaded / 1 loaded),
and 8 concurrent streams reach >= 3x the tokens/s of one stream. Prints the CPU, a table, and as
the last line:
`concurrent_over_single=X mem_8_over_1=Y mem_8_over_1_counted=C server_over_anchor=Z ttft_ms=T ... cpu_kind=...`.

Usage: python bench/bench_inference.py [--rounds 2] [--max-tokens 64] [--data-dir .data] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python bench/<this file>`

from bench.common import AVX2_EMULATION_ENV, REPO_ROOT, cpu_description, median, run_child  # noqa: E402
from service.lifetime import adopt_from_env, owned_child_env  # noqa: E402
from qlora_cli.probe import free_port  # noqa: E402

BUNDLED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper who finds a message "
                                      "in a bottle."}]  # fmt: skip
N_ADAPTERS = 8
LORA_R, LORA_ALPHA, B_STD = 16, 32.0, 0.02
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 600.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".data", help="QLORA_DATA_DIR of the server")
    p.add_argument("--model-id", default=BUNDLED_MODEL_ID)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="repeats of the one-stream and the 8-stream phase")
    p.add_argument("--adapters", type=int, default=N_ADAPTERS, help="adapters = concurrent streams")
    p.add_argument("--skip-anchor", action="store_true")
    p.add_argument("--emulate-avx2", action="store_true", help="cap torch/oneDNN/MKL at AVX2 (bf16 emulated)")
    p.add_argument("--work-dir", type=Path, default=None, help="keep adapters, logs and results here")
    return p


def build_adapters(model_dir: Path, out: Path, n: int, r: int = LORA_R, alpha: float = LORA_ALPHA,
                   b_std: float = B_STD, dtype: str = "float32") -> list[Path]:
    """Save `n` distinct LoRA adapters of `model_dir` under `out` (adapter-0 ...), as PEFT saves them.

    One 4-bit base gets LoRA once; per adapter, A is redrawn as PEFT draws it (kaiming-uniform,
    bound 1/sqrt(in_features)) and B from a normal of std `b_std`, both from generator seed i.
    """
    import torch

    from qlora_core.models import add_lora, load_quantized_model

    model = add_lora(load_quantized_model(model_dir, compute_dtype=dtype, device="cpu"), r, alpha, 0.0,
                     gradient_checkpointing=False, fused_layers=False)  # fmt: skip
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name:  # (r, in)
                    bound = 1.0 / math.sqrt(p.shape[1])
                    p.uniform_(-bound, bound, generator=g)
                elif "lora_B" in name:  # (out, r)
                    p.normal_(std=b_std, generator=g)
        path = out / f"adapter-{i}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def proc_memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of `pid` in MB, from /proc/<pid>/status (which reports kB)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024.0
    return out


class InferenceServer:
    """`python -m qlora_cli.main infer` as an owned child, stopped (then killed) however the bench ends."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
        env.update(QLORA_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "qlora_cli.main", "infer", "--host", "127.0.0.1",
                                          "--port", str(self.port)], env=owned_child_env(env), cwd=REPO_ROOT,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip

    def wait_healthy(self) -> dict:
        import httpx

        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the inference server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + "/healthz", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the inference server was not healthy after {READY_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def memory_mb(self) -> dict[str, float]:
        return proc_memory_mb(self.proc.pid)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class StreamResult:
    ttft_s: float  # request sent -> first non-empty content chunk
    latency_s: float  # request sent -> [DONE]
    tokens: int  # completion tokens, from the usage chunk
    text: str


def body_for(model_id: str, adapter: Path | None, index: int, max_tokens: int, stream: bool = True) -> dict:
    """The JSON of `POST /internal/generate` for the bench prompt on adapter `index` (None: the bare base)."""
    return {"kind": "chat", "model": f"bench-{index}", "messages": PROMPT, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": stream, "include_usage": stream, "base_model_id": model_id,
            "adapter": None if adapter is None else {"key": f"bench-adapter-{index}",
                                                     "path": str(adapter)}}  # fmt: skip


def post(url: str, body: dict) -> dict:
    """A non-streamed request; its JSON answer."""
    import httpx

    r = httpx.post(url + "/internal/generate", json=body, timeout=REQUEST_TIMEOUT_S)
    r.raise_for_status()
    return r.json()


def stream(client: Any, url: str, body: dict) -> StreamResult:
    """One streamed request through `client` (an httpx.Client), timed as a user's client sees it."""
    t0 = time.perf_counter()
    ttft, usage, parts = None, None, []
    with client.stream("POST", url + "/internal/generate", json=body, timeout=REQUEST_TIMEOUT_S) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    parts.append(content)
    latency = time.perf_counter() - t0
    if usage is None or ttft is None:
        raise RuntimeError(f"stream ended without {'usage' if usage is None else 'content'}")
    return StreamResult(ttft, latency, int(usage["completion_tokens"]), "".join(parts))


def concurrent_streams(url: str, bodies: list[dict]) -> tuple[float, list[StreamResult]]:
    """All `bodies` streamed at once (one thread and connection each); (wall seconds, results in order)."""
    import httpx

    results: list[Any] = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies) + 1)

    def one(i: int) -> None:
        try:
            with httpx.Client() as client:
                client.get(url + "/healthz")  # connect before the barrier: the timed part is the request
                barrier.wait(READY_TIMEOUT_S)
                results[i] = stream(client, url, bodies[i])
        except Exception as e:  # handed to the main thread, which raises it
            results[i] = e
            barrier.abort()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    try:
        barrier.wait(READY_TIMEOUT_S)
    except threading.BrokenBarrierError:
        pass  # a thread failed to connect: its error is in `results`
    t0 = time.perf_counter()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S)
    wall = time.perf_counter() - t0
    for r in results:
        if not isinstance(r, StreamResult):
            raise RuntimeError(f"a concurrent stream failed: {r!r}")
    return wall, results


def run_anchor(model_dir: Path, adapters: list[Path], max_tokens: int, dtype: str) -> dict:
    """The hand-written loop (see the module docstring, 3.); per-request tokens, texts and seconds."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from bench.common import load_reference_base

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = load_reference_base(model_dir, dtype)
    base_load_s = time.perf_counter() - t0
    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, T)
    tokens, texts, load_s, generate_s = [], [], [], []
    t_all = time.perf_counter()
    for adapter in adapters:
        t = time.perf_counter()
        model = PeftModel.from_pretrained(base, str(adapter))
        model.eval()
        load_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)  # fmt: skip
        generate_s.append(time.perf_counter() - t)
        new = out[0, ids.shape[1]:].tolist()  # ends at eos (counted, as the server's usage counts it)
        tokens.append(len(new))
        texts.append(tok.decode(new, skip_special_tokens=True))
        base = model.unload()
    total_s = time.perf_counter() - t_all
    return {"dtype": dtype, "base_load_s": base_load_s, "total_s": total_s, "tokens": tokens,
            "texts": texts, "adapter_load_s": load_s, "generate_s": generate_s}  # fmt: skip


def _anchor_main(argv: list[str]) -> int:
    """The anchor's child process: `bench_inference.py --anchor-child --model-dir D --adapter A ... --result-json F`."""
    adopt_from_env()  # the bench's child: die with it (See Note: owned children)
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--adapter", type=Path, action="append", required=True)
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--result-json", type=Path, required=True)
    args = p.parse_args(argv)
    result = run_anchor(args.model_dir, args.adapter, args.max_tokens, args.dtype)
    args.result_json.write_text(json.dumps(result, indent=2))
    return 0


def measure_server(args: argparse.Namespace, adapters: list[Path], work: Path) -> dict:
    """Phases 2's figures (see the module docstring)."""
    import httpx

    server = InferenceServer(args.data_dir, work / "infer.log")
    try:
        server.wait_healthy()
        url, n, mid = server.url, len(adapters), args.model_id
        # The first request names adapter 0, so the adapter wraps the base before its first forward,
        # as in a user's fresh process (See Note: adapters loaded after a forward).
        t = time.perf_counter()
        post(url, body_for(mid, adapters[0], 0, 4, stream=False))
        first_s = time.perf_counter() - t
        mem: dict[str, dict[str, float]] = {"1": server.memory_mb()}
        for i in range(1, n):
            post(url, body_for(mid, adapters[i], i, 4, stream=False))
        mem[str(n)] = server.memory_mb()
        loaded = httpx.get(url + "/healthz").json()["bases"].get(mid, [])
        if len(loaded) != n:
            raise RuntimeError(f"expected {n} adapters loaded, the server holds {loaded}")
        # The engine logs each adapter's tensor bytes; RSS moves by less (freed heap reused) or more
        # (See Note: adapters loaded after a forward).
        adapter_bytes = [int(b) for b in re.findall(r"loaded adapter \S+ \((\d+) bytes\)", server.log_tail(1 << 20))]

        # One stream and 8 streams meet the same server, all 8 adapters loaded.
        single: list[StreamResult] = []
        with httpx.Client() as client:
            for _ in range(args.rounds):
                single.append(stream(client, url, body_for(mid, adapters[0], 0, args.max_tokens)))
        rounds: list[tuple[float, list[StreamResult]]] = []
        for _ in range(args.rounds):
            bodies = [body_for(mid, a, i, args.max_tokens) for i, a in enumerate(adapters)]
            rounds.append(concurrent_streams(url, bodies))
        mem["end"] = server.memory_mb()
        return {"first_s": first_s, "mem": mem, "adapter_bytes": adapter_bytes, "single": single,
                "rounds": rounds}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--anchor-child"]:
        return _anchor_main(argv[1:])
    adopt_from_env()  # started by run_all or a harness: die with it (See Note: owned children)
    args = build_parser().parse_args(argv)
    if args.emulate_avx2:
        os.environ.update(AVX2_EMULATION_ENV)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from qlora_core.device import native_dtype
    from qlora_core.store import ModelStore

    print(f"cpu: {cpu_description()}", flush=True)
    # The machine may be shared: torch's threads then wait on each other's time slices.
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min)", flush=True)
    dtype = native_dtype("cpu").dtype
    model_dir = ModelStore(args.data_dir.resolve() / "models").model_path(args.model_id)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="qlora-bench-infer-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        adapters = build_adapters(model_dir, work / "adapters", args.adapters)
        print(f"[adapters] {len(adapters)} x r={LORA_R} alpha={LORA_ALPHA:g} all-linear, B ~ N(0, {B_STD}) "
              f"in {time.perf_counter() - t:.1f} s", flush=True)  # fmt: skip
        s = measure_server(args, adapters, work)
        anchor = None
        if not args.skip_anchor:
            argv_child = [str(Path(__file__).resolve()), "--anchor-child", "--model-dir", str(model_dir),
                          "--max-tokens", str(args.max_tokens), "--dtype", dtype, "--result-json",
                          str(work / "anchor.json")]  # fmt: skip
            for a in adapters:
                argv_child += ["--adapter", str(a)]
            anchor = run_child("anchor", argv_child, work / "anchor.json", work / "anchor.log")
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return report(args, dtype, s, anchor)


def report(args: argparse.Namespace, dtype: str, s: dict, anchor: Any) -> int:
    """Print the table, the notes under it and the key=value line."""
    from qlora_core.device import native_dtype

    n, single, mem = args.adapters, s["single"], s["mem"]
    single_tps = median([r.tokens / r.latency_s for r in single])
    ttft_ms = median([r.ttft_s for r in single]) * 1000
    decode_tps = median([(r.tokens - 1) / (r.latency_s - r.ttft_s) for r in single])
    pooled = [r for _, rs in s["rounds"] for r in rs]
    agg_tps = median([sum(r.tokens for r in rs) / wall for wall, rs in s["rounds"]])
    lat = [r.latency_s for r in pooled]
    conc_ttft = [r.ttft_s * 1000 for r in pooled]
    rss_1, rss_n = mem["1"]["VmRSS"], mem[str(n)]["VmRSS"]
    tensors_mb = median(s["adapter_bytes"]) / 2**20 if s["adapter_bytes"] else float("nan")
    counted = (rss_1 + (n - 1) * tensors_mb) / rss_1  # as if each adapter cost its tensors, no more, no less

    def row(name: str, tps: float, ttft: str, p50: float, p99: float, tokens: int, rss: str, peak: float) -> None:
        print(f"{name:<30}{tps:>9.1f}{ttft:>9}{p50:>8.2f}{p99:>8.2f}{tokens:>7d}{rss:>8}{peak:>8.0f}")

    print(f"\nserver: first request (loads the base and adapter 0) {s['first_s']:.1f} s; compute dtype {dtype}; "
          f"max_tokens {args.max_tokens}, temperature 0, {args.rounds} round(s) of each phase")  # fmt: skip
    print(f"{'':<30}{'tok/s':>9}{'TTFT ms':>9}{'p50 s':>8}{'p99 s':>8}{'tokens':>7}{'RSS MB':>8}{'peak MB':>8}")
    row("server, 1 stream", single_tps, f"{ttft_ms:.0f}", percentile([r.latency_s for r in single], 50),
        percentile([r.latency_s for r in single], 99), min(r.tokens for r in single), f"{rss_1:.0f}", mem["1"]["VmHWM"])
    row(f"server, {n} streams, {n} adapters", agg_tps, f"{percentile(conc_ttft, 50):.0f}", percentile(lat, 50),
        percentile(lat, 99), min(r.tokens for r in pooled), f"{rss_n:.0f}", mem["end"]["VmHWM"])
    anchor_tps = None
    if anchor is not None:
        a = anchor.result
        anchor_tps = sum(a["tokens"]) / a["total_s"]
        per_request = [x + y for x, y in zip(a["adapter_load_s"], a["generate_s"])]
        row(f"anchor, {n} requests in turn", anchor_tps, "", percentile(per_request, 50), percentile(per_request, 99),
            min(a["tokens"]), "", anchor.peak_rss_mb)
    print(f"(tok/s: completion tokens over the wall time, all streams together; TTFT and latency per request, "
          f"the {n}-stream TTFT its p50 (p99 {percentile(conc_ttft, 99):.0f} ms); peak: VmHWM after the phase, "
          f"the anchor's its process's)")  # fmt: skip
    print(f"1 stream decodes {decode_tps:.1f} tok/s after its first token")
    if anchor is not None:
        print(f"anchor: base loaded in {a['base_load_s']:.1f} s; per request "
              f"PeftModel.from_pretrained {median(a['adapter_load_s']):.2f} s + generate "
              f"{median(a['generate_s']):.2f} s (medians), then unload(); generate alone "
              f"{sum(a['tokens']) / sum(a['generate_s']):.1f} tok/s")  # fmt: skip
        same = sum(r.text == a["texts"][i] for i, r in enumerate(s["rounds"][-1][1]))
        print(f"greedy texts equal to the anchor's: 1 stream {int(single[-1].text == a['texts'][0])}/1, {n} streams "
              f"{same}/{n} (the anchor's 2nd..{n}th on a base its loader moved, the streams batched in bf16: "
              f"See Note: adapters loaded after a forward)")
    print(f"memory (VmRSS): base + 1 adapter {rss_1:.0f} MB, base + {n} adapters "
          f"{rss_n:.0f} MB; the engine counts {tensors_mb:.1f} MB of tensors per adapter, so 1 adapter's RSS + "
          f"{n - 1} x that = {counted:.2f}x")  # fmt: skip
    bf16 = native_dtype("cpu").dtype == "bfloat16"
    kind = "avx2-emulated" if args.emulate_avx2 else ("avx512_bf16" if bf16 else "no-bf16")
    figures = (f"concurrent_over_single={agg_tps / single_tps:.2f} mem_8_over_1={rss_n / rss_1:.2f} "
               f"mem_8_over_1_counted={counted:.2f} "
               + (f"server_over_anchor={agg_tps / anchor_tps:.2f} " if anchor_tps else "")
               + f"ttft_ms={ttft_ms:.0f} single_tps={single_tps:.1f} concurrent_tps={agg_tps:.1f} "
               f"p50_s={percentile(lat, 50):.2f} p99_s={percentile(lat, 99):.2f} "
               + (f"anchor_tps={anchor_tps:.1f} " if anchor_tps else "") + f"cpu_kind={kind}")  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")
    print(f"targets: concurrent_over_single >= 3, mem_8_over_1 <= 1.3 (server VmRSS with {n} adapters / with 1)")
    print(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
