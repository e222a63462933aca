"""export/bench.py: its measuring helpers against plain references, and one real run of the script on a tiny
model over every CPU backend (timings are printed by the script, never asserted)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deeplab import ModelConfig, build_model
from export import bench
from export.cpu import has_vnni

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.backbone=resnet_tiny", "--set", "model.aspp_channels=16", "--set", "model.num_classes=6",
        "--set", "data.synthetic_size=65", "--set", "data.synthetic_val=2", "--set", "data.synthetic_train=2"]
CPU_BACKENDS = {"torch_fp32", "torch_channels_last", "torch_bf16", "torch_bf16_channels_last", "torch_compile",
                "ort_cpu_fp32", "ort_cpu_int8", "ort_cpu_int8_rr", "openvino_fp32", "openvino_int8",
                "openvino_int8_qdq"}
KINDS = {"torch_bf16": "bf16", "torch_bf16_channels_last": "bf16", "ort_cpu_int8": "int8", "ort_cpu_int8_rr": "int8",
         "openvino_int8": "int8", "openvino_int8_qdq": "int8"}


def _conv_flops_by_hooks(model, size):
    """2 x multiply-adds of every Conv2d, from its output shape: an independent count for FlopCounterMode."""
    total = []

    def hook(m, inp, out):
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        total.append(2 * out.numel() * k)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return sum(total)


def test_flop_count_matches_conv_arithmetic():
    model = build_model(ModelConfig(backbone="resnet_tiny", aspp_channels=16, num_classes=6)).eval()
    model.set_output_stride(8)
    assert bench.count_flops(model, 65) == _conv_flops_by_hooks(model, 65)


def test_latency_stats_against_numpy():
    t = [0.010, 0.030, 0.020, 0.050, 0.040]
    s = bench.latency_stats(t)
    assert s["min_ms"] == pytest.approx(10) and s["median_ms"] == pytest.approx(30)
    assert s["p90_ms"] == pytest.approx(np.percentile(np.array(t) * 1000, 90))
    assert s["p99_ms"] == pytest.approx(np.percentile(np.array(t) * 1000, 99))


def test_peak_rss_sees_a_temporary_allocation():
    with bench.PeakRSS(interval=0.001) as mem:
        block = np.ones(64 * 2**20, np.uint8)  # 64 MiB, touched
        block[::4096] = 2
        import time

        time.sleep(0.02)
        del block
    assert mem.peak - mem.start >= 48 * 2**20


def test_bench_script_runs_every_cpu_backend(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "export/bench.py", *TINY, "--size", "65", "--batch", "1", "2",
                           "--repeats", "2", "--accuracy-images", "2", "--calib-images", "2", "--threads", "1",
                           "--backends", ",".join(sorted(CPU_BACKENDS)), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    rows = result["rows"]
    assert {(r["backend"], r["batch"]) for r in rows} == {(b, n) for b in CPU_BACKENDS for n in (1, 2)}
    for r in rows:
        assert r["n"] == 2 and 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["images_per_s"] == pytest.approx(1000 * r["batch"] / r["median_ms"])
        assert r["gflops_per_s"] == pytest.approx(result["flops_per_image"] * r["images_per_s"] / 1e9)
        assert r["peak_mib"] > 0
        kind = KINDS.get(r["backend"], "fp32")
        assert r["kind"] == kind
        if kind in result["limits"]:  # its GFLOP/s against this machine's limit for that arithmetic
            assert r["limit_share"] == pytest.approx(r["gflops_per_s"] / result["limits"][kind])
    assert all(r["speedup_vs_fp32"] == 1.0 for r in rows if r["backend"] == "torch_fp32")
    acc = result["accuracy"]
    assert set(acc) == CPU_BACKENDS
    assert acc["torch_fp32"]["agreement"] == 1.0 and acc["torch_fp32"]["miou_change"] == 0.0
    assert acc["torch_channels_last"]["agreement"] > 0.99 and acc["ort_cpu_fp32"]["agreement"] > 0.99
    assert acc["torch_compile"]["agreement"] > 0.99 and acc["openvino_fp32"]["agreement"] > 0.99
    limits, measured = result["limits"], result["measured_limits"]
    assert measured["fp32"] == max(measured["fp32_by_engine"].values()) >= max(measured["fp32_gemm"],
                                                                                measured["fp32_conv"]) > 0
    assert measured["int8"] == max(measured["int8_by_engine"].values()) > 0
    assert result["cpu"]["vnni"] == has_vnni() and ("bf16" in measured) == result["cpu"]["native_bf16"]
    # %limit is a share of a peak no GEMM measured in the run and no backend passes
    assert limits["cores"] == 1 and all(measured[k] <= limits[k] for k in ("fp32", "bf16", "int8") if k in measured)
    assert all(0 < r["limit_share"] <= 1 for r in rows if "limit_share" in r)
    assert result["flops_per_image"] < result["dense_flops_per_image"]  # OS8 at 65: rates 24, 36 read padding
    skipped = result["skipped"]
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in skipped["cuda_fp32, cuda_fp16"]
    assert "--engine" in skipped["tensorrt engines"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "torch_bf16_channels_last" in proc.stdout and "skipped tensorrt engines" in proc.stdout
    assert result["recommendation"].startswith("fastest CPU path within 1.0 mIoU of fp32")
    # a provider this onnxruntime lacks is skipped with the reason, not an error
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(bench.Skip, match="onnxruntime has no CUDAExecutionProvider"):
            bench.ort_backend("ort_cuda_fp32", out / "model_os8.onnx", "CUDAExecutionProvider", "")


def test_bench_help_as_module():
    proc = subprocess.run([sys.executable, "-m", "export.bench", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--output-stride" in proc.stdout and "--batch" in proc.stdout


def test_recommendation_is_the_fastest_backend_that_keeps_accuracy():
    def row(name, speedup, device="cpu", batch=1):
        return {"backend": name, "speedup_vs_fp32": speedup, "device": device, "batch": batch,
                "median_ms": 100 / speedup}

    rows = [row("torch_fp32", 1.0), row("torch_bf16", 3.0), row("ort_cpu_int8", 4.0), row("cuda_fp16", 50.0, "cuda"),
            row("ort_cpu_int8", 9.0, batch=2)]
    acc = {"torch_fp32": {"miou_change": 0.0}, "torch_bf16": {"miou_change": -0.4},
           "ort_cpu_int8": {"miou_change": -2.5}}
    assert bench.recommend(rows, acc, 1.0).startswith("fastest CPU path within 1.0 mIoU of fp32: torch_bf16 (3.00x")
    assert "ort_cpu_int8 (4.00x" in bench.recommend(rows, acc, 3.0)
    assert "accuracy not measured" in bench.recommend(rows, {}, 1.0)


def test_cpu_features_come_from_the_flags():
    from export import cpu

    assert cpu.has_vnni(frozenset({"avx2", "fma"})) is False
    assert cpu.has_vnni(frozenset({"avx2", "avx_vnni"})) and cpu.has_vnni(frozenset({"avx512f", "avx512_vnni"}))
    flags = cpu.cpu_flags()
    assert cpu.cpu_features()["vnni"] == any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def test_engine_profile_is_read_from_the_sidecar_without_a_gpu():
    from export.runners import TensorRTRunner

    profile = {"shapes": {"min": [1, 3, 257, 257], "opt": [1, 3, 513, 513], "max": [4, 3, 1025, 1025]}}
    assert TensorRTRunner.outside_profile(profile, (4, 3, 1025, 257)) is None
    assert TensorRTRunner.outside_profile(profile, (1, 3, 1024, 2048)) == \
        "outside the engine's profile 1x3x257x257 to 4x3x1025x1025"  # a Cityscapes image
    assert TensorRTRunner.outside_profile(profile, (8, 3, 513, 513)) is not None
    static = {"shapes": {"fixed": [1, 3, 513, 513]}}
    assert TensorRTRunner.outside_profile(static, (1, 3, 513, 513)) is None
    assert TensorRTRunner.outside_profile(static, (2, 3, 513, 513)) == "not the engine's static shape 1x3x513x513"
    assert TensorRTRunner.outside_profile({}, (9, 3, 9, 9)) is None  # nothing recorded: TensorRT will say


def test_inputs_outside_an_engines_profile_are_skipped_with_the_reason_and_the_rest_is_measured():
    """A backend wired as trt_backend wires an engine (refuses = the sidecar's profile): the batch and the
    accuracy images outside it are skipped with the reason; every other figure is still measured. The engine
    itself needs a GPU: an eager model runs in its place."""
    from types import SimpleNamespace

    from deeplab.config import load_config
    from export.runners import TensorRTRunner

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet_tiny", num_classes=6, aspp_channels=16)).eval()
    fp32 = bench.torch_backends(model, cuda=False, bf16=False)[0]
    sidecar = {"shapes": {"min": [1, 3, 33, 33], "opt": [1, 3, 49, 49], "max": [1, 3, 65, 65]}}
    engine = bench.Backend("tensorrt_model", fp32.prepare, fp32.run, note="TensorRT engine (stand-in)",
                           logits=fp32.logits, refuses=lambda shape: TensorRTRunner.outside_profile(sidecar, shape))
    cfg = load_config(None, ["model.num_classes=6", "data.synthetic_classes=6", "data.synthetic_size=80",
                             "data.synthetic_val=2", "export.image_size=49", "export.accuracy_images=2"])
    skipped = {}
    args = SimpleNamespace(batch=[1, 2], warmup=0, repeats=1)
    rows = bench.time_backends([fp32, engine], cfg, args, flops=1, limits={}, skipped=skipped)
    assert [(r["backend"], r["batch"]) for r in rows] == [("torch_fp32", 1), ("tensorrt_model", 1), ("torch_fp32", 2)]
    assert skipped == {"tensorrt_model at batch 2": "input 2x3x49x49: outside the engine's profile 1x3x33x33 "
                                                    "to 1x3x65x65"}
    acc = bench.measure_accuracy([fp32, engine], cfg, 6, skipped)
    assert set(acc) == {"torch_fp32"}
    assert skipped["tensorrt_model accuracy"].startswith("input 1x3x80x80: outside the engine's profile")


def test_a_compared_backbone_is_timed_in_the_same_rounds_with_its_own_flops_and_never_recommended():
    """--compare-backbone: MobileNetV3 next to the subject (ResNet), same head/stride/size; its GFLOP/s use its
    own FLOPs, it has no accuracy (random weights) and the recommendation stays among the subject's paths."""
    from types import SimpleNamespace

    from deeplab.config import load_config

    cfg = load_config(None, ["model.backbone=resnet_tiny", "model.num_classes=6", "model.aspp_channels=16",
                             "export.image_size=49", "data.synthetic_val=2", "data.synthetic_size=49"])
    model = build_model(cfg.model).set_output_stride(8).eval()
    fp32 = bench.torch_backends(model, cuda=False, bf16=False)[0]
    other = bench.backbone_backends(cfg, ["mobilenet_v3_large"])
    assert [b.name for b in other] == ["torch_fp32_mobilenet_v3_large"] and other[0].logits is None
    mobile = build_model(ModelConfig(**{**cfg.model.__dict__, "backbone": "mobilenet_v3_large"}))
    assert other[0].flops == bench.required_flops(mobile.set_output_stride(8).eval(), 49)
    rows = bench.time_backends([fp32, *other], cfg, SimpleNamespace(batch=[1], warmup=0, repeats=2), flops=10**9,
                               limits={})
    row = {r["backend"]: r for r in rows}["torch_fp32_mobilenet_v3_large"]
    assert row["model"] == "mobilenet_v3_large" and row["speedup_vs_fp32"] > 0
    assert row["gflops_per_s"] == pytest.approx(other[0].flops / (row["median_ms"] / 1000) / 1e9)
    faster = [dict(r, speedup_vs_fp32=100.0) if r.get("model") else r for r in rows]
    assert "torch_fp32 (" in bench.recommend(faster, {}, 1.0)
    assert bench.parse_args(["--compare-backbone", "resnet101", "mobilenet_v3_large"]).compare_backbone == \
        ["resnet101", "mobilenet_v3_large"]


def test_every_device_s_memory_is_read_before_and_during_each_call_the_same_way(monkeypatch):
    """interleaved() takes each backend's memory with one sampler: in use just before its call and the peak during
    it. No GPU here, so the driver's reading (cudaMemGetInfo) is replaced by a level the "GPU" call raises and
    lowers again, as TensorRT or onnxruntime would, outside torch's allocator."""
    level = [1000 * 2**20]

    def gpu_call(_):
        level[0] += 300 * 2**20  # a workspace taken for the call...
        time.sleep(0.03)
        level[0] -= 300 * 2**20  # ...and given back before it returns

    monkeypatch.setattr(bench, "device_used_bytes", lambda: level[0])
    backends = [bench.Backend("cpu_row", lambda x: x, lambda x: None), bench.Backend("gpu_row", lambda x: x, gpu_call,
                                                                                     device="cuda")]
    runs = bench.interleaved(backends, {"cpu_row": 0, "gpu_row": 0}, repeats=2, warmup=0)
    assert runs["peak_bytes"]["gpu_row"] == 1300 * 2**20 and runs["extra_bytes"]["gpu_row"] == 300 * 2**20
    assert runs["peak_bytes"]["cpu_row"] >= bench.rss_bytes() // 2  # the process's RSS
    rows = bench.summarize(runs, 10**9, backends, 1, reference="cpu_row")
    assert [(r["memory"], r["timed"]) for r in rows] == [
        ("process RSS", "CPU input to CPU output"),
        ("GPU memory in use (driver: cudaMemGetInfo, whole device)",
         "CUDA input to CUDA output (input copied to the GPU untimed)")]


def test_io_binding_runs_from_device_input_to_device_output_with_the_sessions_logits(tmp_path):
    """The path onnxruntime's GPU rows time, on the device this machine has (the CPU): input bound once, the
    output left as an OrtValue on the device, the same logits as a plain run."""
    from export.metadata import build_metadata
    from export.runners import OnnxRunner
    from export.to_onnx import export_model

    model = build_model(ModelConfig(backbone="resnet_tiny", num_classes=3, aspp_channels=16)).eval()
    runner = OnnxRunner(export_model(model, tmp_path / "m.onnx", build_metadata(model.config)),
                        ["CPUExecutionProvider"])
    x = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(0))
    binding = runner.bind(x.numpy(), "cpu")
    runner.session.run_with_iobinding(binding)
    out = binding.get_outputs()[0]
    assert out.device_name() == "cpu" and out.shape() == [1, 3, 33, 33]
    np.testing.assert_allclose(out.numpy(), runner(x), rtol=0, atol=1e-6)


def test_the_tensorrt_provider_gets_a_cache_folder_and_the_benchmarks_shape_profile(tmp_path):
    from export.runners import trt_provider_options

    options = trt_provider_options("images", [(1, 3, 513, 513), (8, 3, 513, 513), (2, 3, 257, 321)], tmp_path / "c")
    assert options == {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path / "c"),
                       "trt_timing_cache_enable": True, "trt_profile_min_shapes": "images:1x3x257x321",
                       "trt_profile_opt_shapes": "images:1x3x513x513", "trt_profile_max_shapes": "images:8x3x513x513"}
