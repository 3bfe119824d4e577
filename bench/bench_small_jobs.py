"""Small jobs feel small: a 24-example job through the API, and `qlora demo`, timed as a user meets them.

1. `qlora serve` (embedded mode, a fresh private data dir with the bundled SmolLM2-135M-Instruct
   linked in, so no import is timed) and, once its worker has reported, one job through the
   `openai` SDK: 24 short chat examples (the grid's `short` shape, bench/bench_grid.py), 3 epochs,
   `lora_r` 8, `max_seq_length` 128, every other option at its default (`compute_dtype` auto). The
   first job of a fresh worker, so its child pays for importing transformers and loading the model.
   Figures: job creation -> first metrics event, and creation -> `succeeded` (target: <= 60 s).
   Then the same job again once the first has succeeded: a warm worker, whose new pool child
   (one per job, `worker_max_tasks_per_child=1`) has to start and load the model.
2. `qlora demo` (the command `make demo` runs) in another fresh data dir, wall time (target <= 3 min).

`--emulate-avx2` caps torch, oneDNN and MKL at AVX2 for every process (bench/common.py). Prints the
CPU, then as the last line:
`small_job_s=X small_job_first_step_s=Y second_job_s=.. second_job_first_step_s=.. demo_s=Z cpu_kind=...`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python bench/<this file>`

from bench.bench_api_latency import BUNDLED_MODEL_ID, Service, _bin, _idle_workers, _service_env, _wait_until  # noqa: E402
from bench.bench_grid import SHAPES, shape_data  # noqa: E402
from bench.common import AVX2_EMULATION_ENV, REPO_ROOT, cpu_description, resolve_model_dir  # noqa: E402
from service.lifetime import adopt_from_env, owned_child_env  # noqa: E402

JOB_TIMEOUT_S = 1800.0


def _fresh_data_dir(path: Path, bundled: Path) -> Path:
    """A new data dir whose model store already holds the bundled model (linked, not copied)."""
    models = path / "models"
    models.mkdir(parents=True)
    (models / bundled.name).symlink_to(bundled, target_is_directory=True)
    return path


def _run_one(client, upload_id: str, service: Service) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """One job from creation to `succeeded`: (creation -> first metrics event, creation -> succeeded)."""
    t0 = time.monotonic()
    job = client.fine_tuning.jobs.create(model=BUNDLED_MODEL_ID, training_file=upload_id, seed=0,
                                         hyperparameters={"n_epochs": 3},
                                         extra_body={"qlora": {"lora_r": 8, "max_seq_length": 128}})  # fmt: skip
    first = None
    while True:
        if first is None and any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data):
            first = time.monotonic() - t0
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        if time.monotonic() - t0 > JOB_TIMEOUT_S:
            raise RuntimeError(f"job {job.id} still {job.status} after {JOB_TIMEOUT_S:.0f} s")
        time.sleep(0.2)
    total = time.monotonic() - t0
    if job.status != "succeeded":
        raise RuntimeError(f"job {job.id} ended {job.status}: {job.error}\n{service.log_tail()}")
    dtype = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if "compute_dtype" in e.message]
    print(f"[small job] {job.id}: first step {first:.1f} s, succeeded {total:.1f} s after creation, "
          f"{job.trained_tokens} tokens; {dtype[0] if dtype else ''}", flush=True)
    return float(first or total), total


def small_job(work: Path, bundled: Path) -> list[tuple[float, float]]:
    """The job twice on one service, the second created once the first has succeeded (a warm
    worker, whose next pool child must start). Returns (creation -> first metrics event, creation
    -> succeeded) in seconds for each."""
    data_dir = _fresh_data_dir(work / "data-job", bundled)
    service = Service(data_dir, with_worker=True)
    try:
        client = service.wait_ready()
        _wait_until(lambda: _idle_workers(data_dir) >= 1, "the worker's first report", 300)
        train, _ = shape_data(SHAPES["short"])
        body = "".join(json.dumps(row) + "\n" for row in train[:24]).encode()
        upload = client.files.create(file=("short.jsonl", io.BytesIO(body)), purpose="fine-tune")
        return [_run_one(client, upload.id, service) for _ in range(2)]
    finally:
        service.stop()


def demo(work: Path, bundled: Path) -> float:
    """`qlora demo` in a fresh data dir; its wall time in seconds."""
    data_dir = _fresh_data_dir(work / "data-demo", bundled)
    env = _service_env(data_dir)
    log_path = work / "demo.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.run(_bin("qlora") + ["demo"], env=owned_child_env(env), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                              timeout=JOB_TIMEOUT_S)  # fmt: skip
    seconds = time.monotonic() - t0
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"qlora demo failed (exit {proc.returncode}):\n{text[-4000:]}")
    done = [line for line in text.splitlines() if line.startswith("Done in") or "compute_dtype" in line]
    print(f"[demo] {seconds:.0f} s in all; " + " | ".join(done), flush=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    adopt_from_env()  # started by run_all or a harness: die with it (See Note: owned children)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulate-avx2", action="store_true", help="cap torch/oneDNN/MKL at AVX2 (bf16 emulated)")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.emulate_avx2:
        os.environ.update(AVX2_EMULATION_ENV)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qlora_core.device import native_dtype

    print(f"cpu: {cpu_description()}", flush=True)
    bundled = resolve_model_dir(None).resolve()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="qlora-bench-small-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        (first, total), (again_first, again_total) = small_job(work, bundled)
        demo_s = None if args.skip_demo else demo(work, bundled)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    kind = "avx2-emulated" if args.emulate_avx2 else ("avx512_bf16" if native_dtype("cpu").dtype == "bfloat16" else "no-bf16")
    figures = (f"small_job_s={total:.1f} small_job_first_step_s={first:.1f}"
               f" second_job_s={again_total:.1f} second_job_first_step_s={again_first:.1f}")
    figures += f" demo_s={demo_s:.0f}" if demo_s is not None else ""
    print(f"{figures} cpu_kind={kind}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
