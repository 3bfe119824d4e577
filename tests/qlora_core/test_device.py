"""compute_dtype "auto": the dtype each kind of device runs natively (qlora_core/device.py).

The CPU rule is tested on the flags of both CPU kinds this project's hosts have (an AVX512-BF16
EPYC and an AVX2-only one), so both branches run on either; the CUDA branch is tested with torch's
capability query replaced, since no CUDA device exists here (the GPU check, bench/gpu_check.sh,
runs it for real).
"""

from __future__ import annotations

import pytest
import torch

from qlora_core import device
from qlora_core.device import cpu_bf16_native, cpu_flags, native_dtype, resolve_compute_dtype

ZEN5 = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"}  # the AVX512-BF16 kind
ZEN2 = {"avx", "avx2", "fma", "f16c"}  # the AVX2-only kind: no AVX-512, no BF16
SAPPHIRE_RAPIDS = {"avx2", "avx512f", "amx_bf16", "amx_tile", "avx512_fp16"}


@pytest.mark.parametrize("flags,aten,onednn,native", [
    (ZEN5, "AVX512", "ALL", True),
    (SAPPHIRE_RAPIDS, "AVX512", "ALL", True),
    (ZEN2, "AVX2", "ALL", False),
    (ZEN5, "AVX2", "ALL", False),  # ATEN_CPU_CAPABILITY=avx2: ATen's kernels emulate bf16
    (ZEN5, "AVX512", "AVX2", False),  # ONEDNN_MAX_CPU_ISA=AVX2: oneDNN's matmuls emulate it
    (ZEN5, "AVX512", "avx512_core_bf16", True),
    (set(), "DEFAULT", "ALL", False),  # not x86, or no /proc/cpuinfo
])  # fmt: skip
def test_cpu_bf16_is_native_only_with_the_instructions_and_no_cap(flags, aten, onednn, native):
    ok, reason = cpu_bf16_native(flags, aten, onednn)
    assert ok is native
    assert reason  # always says why


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


@pytest.fixture()
def cpu_kind(monkeypatch):
    """Pretend to be one CPU kind: its flags and an uncapped torch."""

    def use(flags: set[str]) -> None:
        monkeypatch.setattr(device, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": set(flags))
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512" if "avx512f" in flags else "AVX2")
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)

    return use


def test_auto_is_bf16_on_avx512_bf16_and_fp32_on_avx2(cpu_kind):
    cpu_kind(ZEN5)
    choice = resolve_compute_dtype("auto", "cpu")
    assert (choice.dtype, choice.emulated) == ("bfloat16", False)
    assert "compute_dtype" in choice.reason and "avx512_bf16" in choice.reason
    cpu_kind(ZEN2)
    choice = resolve_compute_dtype("auto", "cpu")
    assert (choice.dtype, choice.emulated) == ("float32", False)
    assert "compute_dtype" in choice.reason and "no bf16 instructions" in choice.reason


def test_an_explicit_dtype_is_honoured_and_marked_when_emulated(cpu_kind):
    cpu_kind(ZEN2)
    bf16 = resolve_compute_dtype("bfloat16", "cpu")
    assert (bf16.dtype, bf16.emulated) == ("bfloat16", True)
    assert "emulates" in bf16.reason and "auto (float32)" in bf16.reason
    assert resolve_compute_dtype("float32", "cpu").emulated is False
    assert resolve_compute_dtype("float16", "cpu").emulated is True
    cpu_kind(ZEN5)
    assert resolve_compute_dtype("bfloat16", "cpu").emulated is False
    assert resolve_compute_dtype("float16", "cpu").emulated is True  # no AVX512-FP16 on this kind
    cpu_kind(SAPPHIRE_RAPIDS)
    assert resolve_compute_dtype("float16", "cpu").emulated is False


@pytest.mark.parametrize("capability,name,expected", [
    ((9, 0), "NVIDIA H200", "bfloat16"),
    ((8, 0), "NVIDIA A100-SXM4-80GB", "bfloat16"),
    ((7, 5), "Tesla T4", "float16"),
    ((7, 0), "Tesla V100-SXM2-16GB", "float16"),
])  # fmt: skip
def test_cuda_auto_follows_compute_capability(monkeypatch, capability, name, expected):
    """Fake: torch's CUDA queries are replaced (no CUDA device here); bench/gpu_check.sh runs it for real."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
    assert native_dtype("cuda:0").dtype == expected
    assert resolve_compute_dtype("auto", "cuda").dtype == expected
    assert resolve_compute_dtype("bfloat16", "cuda").emulated is (expected != "bfloat16")
    assert resolve_compute_dtype("float16", "cuda").emulated is False


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="compute_dtype must be"):
        resolve_compute_dtype("int8", "cpu")


def test_this_machine_reports_what_its_cpu_has():
    """On the machine running the tests: bf16 exactly when /proc/cpuinfo has the instructions."""
    has = bool(set(device.BF16_CPU_FLAGS) & cpu_flags()) and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
    import os

    capped = (os.environ.get("ONEDNN_MAX_CPU_ISA") or "ALL").lower() not in device._ONEDNN_BF16_ISAS
    assert native_dtype("cpu").dtype == ("bfloat16" if has and not capped else "float32")
