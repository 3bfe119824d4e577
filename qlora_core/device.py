"""Which compute dtype a device runs natively: the rule behind `compute_dtype: "auto"`.

QLoRA computes in bf16 (paper section 3) because the GPUs it targets (compute capability 8.0+) have
bf16 tensor cores. Elsewhere bf16 is emulated, and emulation is not a small tax:

  # Note: emulated bf16. On an AVX2-only 2-core EPYC a (1000x1536) @ (1536x576) torch matmul ran at
  # 40.9 GFLOP/s in float32 and 1.6 GFLOP/s in bfloat16; a short job took 15-25x longer in bf16 than
  # in fp32 (REFERENCES.md, "CPU kinds and dtypes"). On an AVX512-BF16 CPU the same matmul runs at
  # ~380 GFLOP/s in bf16, about twice fp32. On CUDA, bf16 needs compute capability 8.0
  # (`torch.cuda.is_bf16_supported()`); a T4 (7.5) or V100 (7.0) computes fp16 on its tensor cores.

So "auto" resolves per device, where the job runs: bfloat16 on a CUDA GPU of capability >= 8.0 and
on a CPU with AVX512-BF16 or AMX-BF16 that torch and oneDNN are allowed to use; float16 on older
CUDA GPUs; float32 on every other CPU. The CPU rule honours the two switches that cap which
instructions torch's kernels use (`ATEN_CPU_CAPABILITY` for ATen's own kernels, `ONEDNN_MAX_CPU_ISA`
for oneDNN's matmuls), so a host capped below AVX-512 is treated as the AVX2 machine it then is.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

AUTO = "auto"
# CPU flags (Linux /proc/cpuinfo) of instructions that compute bf16 dot products in hardware.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
FP16_CPU_FLAGS = ("avx512_fp16", "amx_fp16")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA, case-insensitive) that still allow its bf16 kernels.
_ONEDNN_BF16_ISAS = {"avx512_core_bf16", "avx512_core_fp16", "avx512_core_amx", "avx512_core_amx_fp16",
                     "avx10_1_512", "avx10_1_512_amx", "avx10_1_512_amx_fp16", "avx10_2_512",
                     "avx10_2_512_amx_2", "all", "default"}  # fmt: skip
# torch.backends.cpu.get_cpu_capability() values under which ATen uses AVX-512 kernels.
_ATEN_AVX512 = {"AVX512", "AVX512_BF16", "AMX"}


@dataclass(frozen=True)
class DtypeChoice:
    """The compute dtype a run uses on a device, and why.

    Attributes:
        dtype: "bfloat16", "float16" or "float32".
        reason: one human-readable sentence naming the device and what decided it.
        emulated: the device has no native arithmetic for `dtype` (an explicit choice the
            caller should warn about: it runs, but many times slower).
    """

    dtype: str
    reason: str
    emulated: bool = False


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / arm64 spelling
            return set(value.split())
    return set()


def cpu_bf16_native(flags: set[str] | None = None, aten_capability: str | None = None,
                    onednn_max_isa: str | None = None) -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively for torch, with the reason.

    Args:
        flags: CPU flags (default: read /proc/cpuinfo).
        aten_capability: `torch.backends.cpu.get_cpu_capability()` (default: ask torch).
        onednn_max_isa: the `ONEDNN_MAX_CPU_ISA` cap (default: the environment's).

    Returns:
        (native, reason): reason names the flags or the cap that decided it.
    """
    flags = cpu_flags() if flags is None else flags
    if aten_capability is None:
        import torch

        aten_capability = torch.backends.cpu.get_cpu_capability()
    if onednn_max_isa is None:
        onednn_max_isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL"
    have = sorted(f for f in BF16_CPU_FLAGS if f in flags)
    machine = platform.machine() or "cpu"
    if not have:
        return False, f"the {machine} CPU has no bf16 instructions (neither {' nor '.join(BF16_CPU_FLAGS)})"
    if aten_capability.upper() not in _ATEN_AVX512:
        return False, (f"the CPU has {'+'.join(have)} but torch runs its {aten_capability} kernels "
                       "(ATEN_CPU_CAPABILITY), which emulate bf16")  # fmt: skip
    if onednn_max_isa.lower() not in _ONEDNN_BF16_ISAS:
        return False, f"the CPU has {'+'.join(have)} but oneDNN is capped at {onednn_max_isa} (ONEDNN_MAX_CPU_ISA)"
    return True, f"the CPU has {'+'.join(have)}"


def default_device() -> str:
    """Where a run computes when nobody says: "cuda" when a GPU is visible, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def native_dtype(device: str = "cpu") -> DtypeChoice:
    """The fastest 16-bit-or-wider dtype `device` computes natively ("auto"'s answer).

    Args:
        device: a torch device string: "cpu", "cuda" or "cuda:N".

    Returns:
        The choice with its reason; never emulated.
    """
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        name = torch.cuda.get_device_name(index)
        if (major, minor) >= (8, 0):
            return DtypeChoice("bfloat16", f"{name} (compute capability {major}.{minor}) has bf16 tensor cores")
        return DtypeChoice("float16", f"{name} (compute capability {major}.{minor}) has no bf16; fp16 tensor cores")
    native, why = cpu_bf16_native()
    if native:
        return DtypeChoice("bfloat16", f"{why}: bf16 is native")
    return DtypeChoice("float32", f"{why}: float32 is the fastest native choice")


def resolve_compute_dtype(requested: str, device: str = "cpu") -> DtypeChoice:
    """Resolve a job's `compute_dtype` on the device it runs on.

    Args:
        requested: "auto", "bfloat16", "float16" or "float32".
        device: the torch device the run computes on.

    Returns:
        "auto": the device's native choice. An explicit dtype is honoured as asked, marked
        `emulated` when the device has no native arithmetic for it.

    Raises:
        ValueError: an unknown dtype name.
    """
    if requested == AUTO:
        native = native_dtype(device)
        return DtypeChoice(native.dtype, f"compute_dtype auto resolved to {native.dtype}: {native.reason}")
    if requested not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"compute_dtype must be 'auto', 'bfloat16', 'float16' or 'float32', got {requested!r}")
    if requested == "float32":
        return DtypeChoice("float32", "compute_dtype float32 as requested")
    native = native_dtype(device)
    if device.startswith("cuda"):
        emulated = requested == "bfloat16" and native.dtype != "bfloat16"
    elif requested == "float16":  # oneDNN computes fp16 only with AVX512-FP16 or AMX-FP16
        emulated = not (set(FP16_CPU_FLAGS) & cpu_flags()) or native.dtype != "bfloat16"
    else:
        emulated = native.dtype != "bfloat16"
    if emulated:
        return DtypeChoice(requested, f"compute_dtype {requested} as requested, but this device emulates it "
                                      f"({native.reason}); expect a much slower run than with "
                                      f"compute_dtype auto ({native.dtype})", emulated=True)  # fmt: skip
    return DtypeChoice(requested, f"compute_dtype {requested} as requested ({native.reason})")
