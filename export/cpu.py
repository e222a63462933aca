"""What this CPU can do, detected at run time and never assumed: the instruction sets that decide which int8
and bf16 paths are fast, or even exact.

- VNNI (avx512_vnni, avx_vnni, amx_int8): int8 dot products accumulate in int32. Without it the u8 x s8
  path multiplies into saturating int16 pairs (VPMADDUBSW), so int8 models need 7-bit weights
  (onnxruntime ``reduce_range``) or NNCF's overflow fix to stay accurate.
- native bf16 (avx512_bf16, amx_bf16): without it oneDNN emulates bf16 4-100x slower than fp32.

`peak_limits` is the most arithmetic per second it can do (bench's %limit: an upper bound from the flags,
cores and clock, explained above it); `measured_limits` is what GEMMs reach now, reported against it.
"""
from __future__ import annotations

import functools
import glob
import os
import platform
import re
import time
from typing import Optional

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


# ----------------------------------------------------------------------------------------------- limits
def _best_seconds(fn, repeats: int = 5) -> float:
    """The fastest of `repeats` timed calls after one warm-up: peak throughput, not a typical latency."""

    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _gemm_onnx(n: int, int8: bool) -> bytes:
    """An n x n x n GEMM as ONNX: plain fp32 MatMul, or int8 Q/DQ (int8 activations and weights), which
    onnxruntime and OpenVINO run as an int8 kernel."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        inits = [numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "w"),
                 numpy_helper.from_array(np.array(0.02, np.float32), "s"),
                 numpy_helper.from_array(np.array(0, np.int8), "z")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"]),
                 helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    else:
        inits = [numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _onnx_gemm_rates(n: int, threads: int, int8: bool) -> dict:
    """G(FL)OP/s of the GEMM above in onnxruntime and OpenVINO (OpenVINO held to f32 for the fp32 one: it would
    otherwise run bf16 on CPUs with AMX)."""
    import numpy as np

    rates, ops = {}, 2 * n ** 3
    model, x = _gemm_onnx(n, int8), np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        rates["onnxruntime"] = ops / _best_seconds(lambda: session.run(None, {"x": x})) / 1e9
    except ImportError:
        pass
    try:
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        if not int8:
            config["INFERENCE_PRECISION_HINT"] = "f32"
        core = ov.Core()
        compiled = core.compile_model(core.read_model(model, ov.Tensor(np.empty(0, np.uint8))), "CPU", config)
        request = compiled.create_infer_request()
        rates["openvino"] = ops / _best_seconds(lambda: request.infer({0: x})) / 1e9
    except ImportError:
        pass
    return rates


def _int8_gemm_rates(n: int, threads: int) -> dict:
    """GOP/s of an int8 GEMM in every engine here that has one (torch, onnxruntime, OpenVINO)."""
    import torch

    rates = {}
    a = torch.randint(-127, 128, (n, n), dtype=torch.int8)
    try:
        rates["torch._int_mm"] = 2 * n ** 3 / _best_seconds(lambda: torch._int_mm(a, a)) / 1e9
    except Exception:  # no int8 GEMM kernel in this torch build
        pass
    return {**rates, **_onnx_gemm_rates(n, threads, int8=True)}


def measured_limits(threads: int, n: Optional[int] = None) -> dict:
    """What dense arithmetic reaches here in GFLOP/s (GOP/s for int8), measured now with `threads` (reported
    beside `peak_limits`; engines beat these GEMMs, so they are no limit). n (default 1024, 2048 above 4
    threads): a 1024^3 GEMM is ~20 ms on one core, long enough for a steady rate; on 1 thread 1024 and 2048
    gave the same rates while 2048 took 7.6 s of every benchmark instead of 1.2 s.
    fp32 = the fastest of an n^3 GEMM (torch, onnxruntime, OpenVINO at f32) and a 3x3 256-channel convolution at
    65x65 (NCHW or channels_last),
    bf16 = a bf16 GEMM where the CPU has native bf16, int8 = the fastest int8 GEMM any engine here runs."""
    import torch

    n = n or (1024 if threads <= 4 else 2048)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n)
        gemm = 2 * n ** 3 / _best_seconds(lambda: a @ a) / 1e9
        conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).eval()
        x = torch.randn(1, 256, 65, 65)
        conv_ops = 2 * 256 * 256 * 9 * 65 * 65
        with torch.inference_mode():
            nchw = conv_ops / _best_seconds(lambda: conv(x)) / 1e9
            conv_cl, x_cl = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            nhwc = conv_ops / _best_seconds(lambda: conv_cl(x_cl)) / 1e9
        fp32 = {"torch_gemm": gemm, "torch_conv": max(nchw, nhwc),
                **{f"{k}_gemm": v for k, v in _onnx_gemm_rates(n, threads, int8=False).items()}}
        limits = {"fp32": max(fp32.values()), "fp32_gemm": gemm, "fp32_conv": max(nchw, nhwc), "fp32_by_engine": fp32}
        if has_native_bf16():
            b = a.bfloat16()
            limits["bf16"] = 2 * n ** 3 / _best_seconds(lambda: b @ b) / 1e9
        int8 = _int8_gemm_rates(n, threads)
        if int8:
            limits["int8"] = max(int8.values())
            limits["int8_by_engine"] = int8
        return limits
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------- peak
# The benchmark's %limit is a share of the most arithmetic this CPU can possibly do, so that no backend can pass
# 100%: a measured GEMM is only what one engine reached (others beat it by up to 1.4x on this project's
# machines), so the limit is computed instead, as
#
#     peak = operations per cycle per core (from the instruction set) x cores used x a bound on the clock
#
# Operations per cycle take the widest units the instruction set allows, since the flags cannot tell how many
# a core has: two FMA units of the vector width (x86: AVX-512 16 fp32 lanes, AVX/AVX2 8, SSE 4; a multiply-add
# counts 2), so fp32 = 4 x lanes (64 with AVX-512, as Intel Xeon Gold/Platinum issue). One known exception:
# AMD family 25 (Zen 3/4) has 256-bit FMA units and runs AVX-512 in two halves (32). bf16: AVX512_BF16's dot
# product does two bf16 products per fp32 lane (2 x fp32), AMX-BF16 1024 multiply-adds per cycle (2048);
# without them bf16 runs as fp32. int8: four u8 x s8 products per 32-bit lane (VNNI, or AVX2/AVX-512BW's
# multiply-add pairs: 4 x fp32), AMX-INT8 2048 multiply-adds (4096). ARM: 4 FMA pipes of 128 bits (32), SVE
# counted as 2 x 512 bits (64); bf16 (BFMMLA) 4 x fp32, int8 dot products 4 x fp32 (i8mm 8 x).
# Cores: the logical CPUs this process may run on, at most the threads the benchmark gives each backend.
# Clock: the highest of the cpufreq maximum (sysfs; lscpu's "CPU max MHz" is the same), /proc/cpuinfo's
# "cpu MHz" and the model name's "@ x.xxGHz". Only intel_pstate and amd-pstate publish the boost clock as
# the maximum; otherwise (a virtual machine shows the nominal clock only; acpi-cpufreq the highest P-state)
# boost can run above it, so the bound is that clock x BOOST_ALLOWANCE, above the ratio of boost to nominal
# clock of the server CPUs VMs run on (AMD EPYC 9634: 3.7/2.25 GHz = 1.64; Intel Xeon 8480+: 3.8/2.0 = 1.9).
X86_FP32_PER_CYCLE = (("avx512f", 64), ("avx2", 32), ("avx", 32), ("sse2", 16), ("sse", 16))
ARM_FP32_PER_CYCLE = (("sve", 64), ("asimd", 32))
BOOST_AWARE_DRIVERS = ("intel_pstate", "intel_cpufreq", "amd-pstate", "amd-pstate-epp")
BOOST_ALLOWANCE = 2.0


def ops_per_cycle(flags, amd_family: Optional[int] = None) -> dict:
    """{"fp32", "bf16", "int8"} -> the most operations one core can issue per cycle with these CPU flags (a
    multiply-add counts 2); empty where the flags name no known vector unit. ``amd_family``: AMD's CPU family
    (25: 256-bit FMA units)."""
    fp32 = next((ops for flag, ops in X86_FP32_PER_CYCLE if flag in flags), None)
    if fp32 is not None:
        if amd_family == 25:
            fp32 = min(fp32, 32)
        bf16 = 2048 if "amx_bf16" in flags else 2 * fp32 if "avx512_bf16" in flags else fp32
        int8 = 4096 if "amx_int8" in flags else 4 * fp32
        return {"fp32": fp32, "bf16": bf16, "int8": int8}
    fp32 = next((ops for flag, ops in ARM_FP32_PER_CYCLE if flag in flags), None)
    if fp32 is not None:
        int8 = 8 * fp32 if "i8mm" in flags else 4 * fp32 if "asimddp" in flags else 2 * fp32
        return {"fp32": fp32, "bf16": 4 * fp32 if "bf16" in flags else fp32, "int8": int8}
    return {}


def _cpuinfo_fields() -> dict:
    """The first processor's vendor and family, the highest "cpu MHz" of all, the model name's GHz."""

    info = {"vendor": "", "family": None, "mhz": 0.0, "named_ghz": 0.0}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "vendor_id" and not info["vendor"]:
                    info["vendor"] = value
                elif key == "cpu family" and info["family"] is None:
                    info["family"] = int(value)
                elif key == "cpu MHz":
                    info["mhz"] = max(info["mhz"], float(value))
                elif key == "model name":
                    m = re.search(r"@\s*([\d.]+)\s*GHz", value)
                    info["named_ghz"] = max(info["named_ghz"], float(m.group(1)) if m else 0.0)
    except (OSError, ValueError):
        pass
    return info


def _cpufreq() -> tuple:
    """(the highest cpuinfo_max_freq over the CPUs in Hz, 0 where absent; cpu0's scaling driver)."""

    best = 0.0
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq"):
        try:
            with open(path) as f:
                best = max(best, int(f.read().strip()) * 1e3)  # kHz
        except (OSError, ValueError):
            pass
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_driver") as f:
            driver = f.read().strip()
    except OSError:
        driver = ""
    return best, driver


def clock_bound(sysfs_hz: float, driver: str, cpuinfo_mhz: float, named_ghz: float) -> tuple:
    """(Hz no core passes, how it was found) from the clocks the machine publishes; (0.0, ...) where none."""
    hz = max(sysfs_hz, cpuinfo_mhz * 1e6, named_ghz * 1e9)
    if hz <= 0:
        return 0.0, "no clock published"
    source = "cpufreq maximum" if hz == sysfs_hz else "/proc/cpuinfo" if hz == cpuinfo_mhz * 1e6 else "model name"
    if hz == sysfs_hz and driver in BOOST_AWARE_DRIVERS:
        return hz, f"{hz / 1e9:.2f} GHz ({source}, {driver})"
    return hz * BOOST_ALLOWANCE, (f"{hz / 1e9:.2f} GHz ({source}) x {BOOST_ALLOWANCE:g} for boost: "
                                  "no boost maximum published")


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def peak_limits(threads: int, flags=None, clock_hz: Optional[float] = None, cpus: Optional[int] = None,
                amd_family: Optional[int] = None) -> dict:
    """This CPU's peak in GFLOP/s (GOP/s for int8) per arithmetic with ``threads`` threads: an upper bound no
    backend can pass (see the comment above). {"fp32", "bf16", "int8", and how: "cores", "clock_ghz",
    "clock_source", "ops_per_cycle"}; no fp32/bf16/int8 keys where the flags or the clock are unknown.
    Arguments left None are read from this machine."""
    source, info = "given", _cpuinfo_fields() if flags is None or clock_hz is None else {}
    if flags is None:
        flags, amd_family = cpu_flags(), info["family"] if info["vendor"] == "AuthenticAMD" else None
    if clock_hz is None:
        clock_hz, source = clock_bound(*_cpufreq(), info["mhz"], info["named_ghz"])
    cores = max(1, min(int(threads), usable_cpus() if cpus is None else cpus))
    per_cycle = ops_per_cycle(flags, amd_family) if clock_hz > 0 else {}
    limits = {kind: ops * cores * clock_hz / 1e9 for kind, ops in per_cycle.items()}
    return {**limits, "cores": cores, "clock_ghz": clock_hz / 1e9, "clock_source": source,
            "ops_per_cycle": per_cycle}
