"""What a worker trains on, how much memory it has and which compute dtype its device runs natively:
the report recorded in its Worker row (the fit check reads it; qlora_core/device.py has the dtype rule).

The probe imports torch and, on a GPU machine, calls CUDA (`torch.cuda.mem_get_info`). A worker's
parent process forks its training children and must never touch CUDA itself ("Cannot
re-initialize CUDA in forked subprocess", REFERENCES.md "Celery for long GPU jobs"), so the parent
runs the probe in a short-lived subprocess (`probe_in_subprocess`); `python -m worker.device`
prints the same report as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

from service.lifetime import adopt_from_env, owned_child_env

log = logging.getLogger(__name__)


def device_report() -> dict[str, Any]:
    """Probe the device in *this* process (it may initialise CUDA: never call it in a worker parent).

    Returns:
        {"device": "cuda:0 (NVIDIA H100 80GB HBM3)" | "cpu (8 cores)", "memory_bytes": total bytes
        of device memory (system RAM on CPU), "free_bytes": what is free now, "compute_dtype": what
        `compute_dtype: "auto"` resolves to here (None without torch), "dtype_reason": why}.
    """
    import psutil

    try:
        import torch

        from qlora_core.device import native_dtype

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info(0)
            name = torch.cuda.get_device_name(0)
            choice = native_dtype("cuda:0")
            return {"device": f"cuda:0 ({name})", "memory_bytes": int(total), "free_bytes": int(free),
                    "compute_dtype": choice.dtype, "dtype_reason": choice.reason}  # fmt: skip
        choice = native_dtype("cpu")
        dtype, reason = choice.dtype, choice.reason
    except ImportError:  # torch missing: a torch-free install can still report its RAM
        log.warning("torch is not installed; reporting system memory")
        dtype, reason = None, "torch is not installed"
    vm = psutil.virtual_memory()
    return {"device": f"cpu ({os.cpu_count()} cores)", "memory_bytes": int(vm.total), "free_bytes": int(vm.available),
            "compute_dtype": dtype, "dtype_reason": reason}  # fmt: skip


def probe_in_subprocess(timeout_s: float = 300.0, override_memory_bytes: int | None = None) -> dict[str, Any]:
    """Run `device_report` in a fresh Python process and return its result.

    Args:
        timeout_s: give up after this long (torch imports slowly on a busy machine).
        override_memory_bytes: `Settings.device_memory_bytes`, replaces the measured total.

    Returns:
        The report; on a probe failure, system RAM from psutil with `device` "unknown".
    """
    try:
        out = subprocess.run(
            [sys.executable, "-m", "worker.device"],
            env=owned_child_env(dict(os.environ)),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        )
        report = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, json.JSONDecodeError, IndexError, OSError) as e:
        log.warning("device probe failed (%s); reporting system memory", e)
        import psutil

        report = {"device": "unknown", "memory_bytes": int(psutil.virtual_memory().total), "free_bytes": 0,
                  "compute_dtype": None, "dtype_reason": f"device probe failed: {e}"}  # fmt: skip
    if override_memory_bytes:
        report["memory_bytes"] = int(override_memory_bytes)
    return report


if __name__ == "__main__":
    adopt_from_env()
    print(json.dumps(device_report()))
