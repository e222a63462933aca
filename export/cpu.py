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


# ----------------------------------------------------------------------------------------------- limits
def _best_seconds(fn, repeats: int = 5) -> float:
    """The fastest of `repeats` timed calls after one warm-up: peak throughput, not a typical latency."""
    import time

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


def measured_limits(threads: int, n: int = 2048) -> dict:
    """This machine's dense-arithmetic limits in GFLOP/s (GOP/s for int8), measured now with `threads`:
    fp32 = the fastest of an n^3 GEMM (torch, onnxruntime, OpenVINO at f32) and a 3x3 256-channel convolution at
    65x65 (NCHW or channels_last),
    bf16 = a bf16 GEMM where the CPU has native bf16, int8 = the fastest int8 GEMM any engine here runs."""
    import torch

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
