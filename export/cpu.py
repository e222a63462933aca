"""What this CPU can do, detected at run time and never assumed: the instruction sets that decide which int8
and bf16 paths are fast, or even exact.

- VNNI (avx512_vnni, avx_vnni, amx_int8): int8 dot products accumulate in int32. Without it the u8 x s8
  path multiplies into saturating int16 pairs (VPMADDUBSW), so int8 models need 7-bit weights
  (onnxruntime ``reduce_range``) or NNCF's overflow fix to stay accurate.
- native bf16 (avx512_bf16, amx_bf16): without it oneDNN emulates bf16 4-100x slower than fp32.
"""
from __future__ import annotations

import functools
import platform

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The first processor's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_vnni(flags=None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in VNNI_FLAGS)


def has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (what torch itself reports, else the CPU flags)."""
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return any(f in cpu_flags() for f in BF16_FLAGS)


def cpu_features() -> dict:
    """A JSON-ready summary for benchmark reports and model metadata."""
    flags = cpu_flags()
    info = {"cpu": cpu_name(), "avx2": "avx2" in flags, "avx512": "avx512f" in flags, "vnni": has_vnni(flags),
            "native_bf16": has_native_bf16(), "amx": "amx_tile" in flags}
    try:
        import torch

        info["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:
        pass
    return info
