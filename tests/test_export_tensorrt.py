"""TensorRT logic that needs no GPU: profiles from flags, the TensorRT 10 / 11 build path, the sidecar that
ties an engine to its GPU and TensorRT version, and onnxruntime provider order. Building and running a real
engine needs an NVIDIA GPU and tensorrt, which CI does not have; a GPU machine's fields are written by hand
here where a test needs "another machine"."""
import hashlib

import pytest
import torch

from deeplab.config import ConfigError, load_config
from export import runners
from export import to_tensorrt as trt_cli
from export.config import ExportConfig
from export.runners import EngineError, check_sidecar, read_sidecar, sidecar_path, write_sidecar

H100 = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt_version": "11.4.0.12"}


def test_profile_shapes_are_checked_by_the_config():
    assert ExportConfig.parse_shape("opt_shape", "2,3,257,257") == (2, 3, 257, 257)
    for bad in ("1x3x513", "1x3xax513", "0x3x513x513", "1x1x513x513"):
        with pytest.raises(ConfigError, match="export.opt_shape="):
            ExportConfig(opt_shape=bad)
    shapes = ExportConfig(min_shape="1x3x257x257", opt_shape="1x3x513x513", max_shape="4x3x1025x1025").profile()
    assert shapes == {"min": (1, 3, 257, 257), "opt": (1, 3, 513, 513), "max": (4, 3, 1025, 1025)}
    with pytest.raises(ConfigError, match="H must satisfy min <= opt <= max, got 257, 2000, 1025"):
        load_config(None, ["export.opt_shape=1x3x2000x513"])
    assert trt_cli.static_profile([1, 3, 513, 513]) == (1, 3, 513, 513)
    assert trt_cli.static_profile([None, 3, 513, 513]) is None


@pytest.mark.parametrize("version,path", [("10.0.1", "flags"), ("10.13.3.9", "flags"), ("11.0.0", "typed"),
                                          ("11.4.0.12", "typed"), ("12.1", "typed")])
def test_build_path_from_version(version, path):
    assert trt_cli.build_path(version) == path


def test_old_or_garbled_tensorrt_version():
    with pytest.raises(trt_cli.Unsupported, match="TensorRT 8.6.1 is too old"):
        trt_cli.build_path("8.6.1")
    with pytest.raises(ValueError, match="cannot read a TensorRT version"):
        trt_cli.build_path("unknown")


def test_precision_lives_in_flags_on_10_and_in_the_onnx_on_11():
    assert trt_cli.builder_flags("fp16", "flags") == ["FP16"]
    assert trt_cli.builder_flags("bf16", "flags") == ["BF16"]
    assert trt_cli.builder_flags("int8", "flags") == ["INT8", "FP16"]
    assert trt_cli.builder_flags("fp32", "flags") == []
    assert all(trt_cli.builder_flags(p, "typed") == [] for p in trt_cli.PRECISIONS)
    # which ONNX the builder parses
    assert [trt_cli.onnx_variant(p, "flags") for p in trt_cli.PRECISIONS] == ["fp32", "fp32", "fp32", "int8"]
    assert [trt_cli.onnx_variant(p, "typed") for p in trt_cli.PRECISIONS] == ["fp32", "fp16", "bf16", "int8"]
    assert [trt_cli.onnx_variant(p, None) for p in trt_cli.PRECISIONS] == ["fp32", "fp16", "bf16", "int8"]
    with pytest.raises(ConfigError, match="export.precision='fp8' is unknown"):
        ExportConfig(precision="fp8")


def test_this_machine_cannot_build_and_says_why():
    reason = trt_cli.machine_blocker()
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    if has_trt and torch.cuda.is_available():
        assert reason is None
    else:
        assert reason and ("tensorrt is not installed" in reason or "no CUDA GPU" in reason)


def test_sidecar_roundtrip_is_atomic_and_complete(tmp_path):
    onnx_file = tmp_path / "model.int8.onnx"
    onnx_file.write_bytes(b"onnx bytes")
    shapes = ExportConfig().profile()
    info = trt_cli.make_sidecar(H100, "int8", "typed", shapes, onnx_file, {"output_stride": 8},
                                parity={"max_abs_diff": 0.01})
    engine = tmp_path / "model.engine"

    def describe(tmp):  # the engine is complete under its temporary name, not yet under its own
        assert tmp.read_bytes() == b"serialized" and tmp.parent == tmp_path and not engine.exists()
        return info

    trt_cli.write_engine(engine, b"serialized", describe)
    assert engine.read_bytes() == b"serialized"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.engine", "model.engine.json", "model.int8.onnx"]
    back = read_sidecar(engine)
    assert back["onnx_sha256"] == hashlib.sha256(b"onnx bytes").hexdigest()
    assert back["engine_sha256"] == hashlib.sha256(b"serialized").hexdigest()  # what the runner checks
    assert back["shapes"]["opt"] == [1, 3, 513, 513] and back["precision"] == "int8"
    assert back["metadata"] == {"output_stride": 8} and back["parity"] == {"max_abs_diff": 0.01}
    check_sidecar(back, dict(H100), engine)  # same machine: accepted

    def fails(tmp):
        raise RuntimeError("parity failed")

    with pytest.raises(RuntimeError, match="parity failed"):
        trt_cli.write_engine(tmp_path / "other.engine", b"serialized", fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.engine", "model.engine.json", "model.int8.onnx"]


@pytest.mark.parametrize("field,value,words", [
    ("gpu_name", "NVIDIA A10G", "GPU NVIDIA H100 80GB HBM3 (here: NVIDIA A10G)"),
    ("compute_capability", "8.6", "compute capability 9.0 (here: 8.6)"),
    ("tensorrt_version", "10.13.3.9", "TensorRT 11.4.0.12 (here: 10.13.3.9)")])
def test_mismatched_sidecar_is_refused(field, value, words):
    with pytest.raises(EngineError) as e:
        check_sidecar(H100, {**H100, field: value}, "model.engine")
    msg = str(e.value)
    assert words in msg and "rebuild it here" in msg and "\n" not in msg


def test_no_gpu_or_no_tensorrt_is_refused():
    with pytest.raises(EngineError, match="no CUDA GPU here"):
        check_sidecar(H100, {"gpu_name": None, "compute_capability": None, "tensorrt_version": "11.4.0.12"})
    with pytest.raises(EngineError, match="tensorrt is not installed"):
        check_sidecar(H100, {**H100, "tensorrt_version": None})


def test_runner_refuses_engine_before_touching_tensorrt(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"serialized")
    with pytest.raises(EngineError, match="no sidecar model.engine.json"):
        runners.TensorRTRunner(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        runners.TensorRTRunner(engine)
    write_sidecar(engine, H100)
    here = runners.device_info()
    if here["gpu_name"] != H100["gpu_name"] or here["tensorrt_version"] != H100["tensorrt_version"]:
        with pytest.raises(EngineError, match="model.engine"):
            runners.TensorRTRunner(engine)
    with pytest.raises(ValueError, match="lacks tensorrt_version"):
        write_sidecar(engine, {"gpu_name": "x", "compute_capability": "8.0"})


def test_tensorrt_dtype_names_map_to_torch():
    assert runners.torch_dtype_for("DataType.FLOAT") is torch.float32
    assert runners.torch_dtype_for("HALF") is torch.float16
    assert runners.torch_dtype_for("BF16") is torch.bfloat16
    with pytest.raises(EngineError, match="FP8"):
        runners.torch_dtype_for("FP8")


def test_providers_kept_in_order_and_filtered():
    avail = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runners.pick_providers(None, avail) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runners.pick_providers(["CPUExecutionProvider", "CUDAExecutionProvider"], avail) == \
        ["CPUExecutionProvider", "CUDAExecutionProvider"]
    with pytest.raises(ValueError, match="none of the providers TensorrtExecutionProvider"):
        runners.pick_providers(["TensorrtExecutionProvider"], avail)
    with pytest.raises(ValueError, match="unknown onnxruntime provider"):
        runners.pick_providers(["cuda"], avail)
    assert runners.pick_providers()[-1] == "CPUExecutionProvider"  # this machine's onnxruntime


def test_int8_other_layers_run_in_fp16_on_both_tensorrt_paths_or_the_sidecar_says_fp32():
    assert trt_cli.int8_layout("flags", False)["int8_other_layers"] == "fp16 (BuilderFlag.FP16)"
    assert trt_cli.int8_layout("typed", True) == {"int8_quantizer": "modelopt.onnx.quantization",
                                                  "int8_other_layers": "fp16 (high_precision_dtype)"}
    assert trt_cli.int8_layout("typed", False)["int8_other_layers"].startswith("fp32")


def test_tensorrt_11_int8_asks_modelopt_for_fp16_other_layers_and_keeps_the_metadata(tmp_path, monkeypatch):
    """ModelOpt is a GPU-side package this machine does not have: a stand-in with its documented signature
    records the call and writes a real Q/DQ ONNX (onnxruntime's quantizer); the rest is the project's code."""
    from types import SimpleNamespace

    from deeplab import ModelConfig, build_model
    from export.metadata import read_metadata
    from export.precision import quantize_int8
    from export.to_onnx import export_model

    model = build_model(ModelConfig(backbone="resnet_tiny", num_classes=3, aspp_channels=8)).eval()
    fp32 = export_model(model, tmp_path / "m.onnx", {"num_classes": 3}, torch.randn(2, 3, 33, 33))
    calls = []

    def quantize(onnx_path, quantize_mode="int8", calibration_data=None, calibration_method=None,
                 calibration_eps=("cpu", "cuda:0", "trt"), high_precision_dtype="fp16", output_path=None, **kw):
        calls.append(dict(mode=quantize_mode, shape=calibration_data.shape, eps=list(calibration_eps),
                          high=high_precision_dtype, method=calibration_method))
        quantize_int8(onnx_path, output_path, [calibration_data[:1]])

    monkeypatch.setattr(trt_cli, "modelopt_quantize", lambda: quantize)
    cfg = load_config(None, ["model.num_classes=3", "data.synthetic_classes=3", "data.synthetic_size=40",
                             "export.precision=int8", "export.calib_images=2", "export.min_shape=1x3x33x33",
                             "export.opt_shape=1x3x49x49", "export.max_shape=1x3x65x65"])
    args = SimpleNamespace(calib_data=None, check_accuracy=False)
    files, record = trt_cli.precision_onnx(fp32, cfg.check(), args, "typed")
    assert calls == [dict(mode="int8", shape=(2, 3, 49, 49), eps=["cpu"], high="fp16", method="max")]
    assert record == trt_cli.int8_layout("typed", True) and files["int8"] == tmp_path / "m.int8.onnx"
    meta = read_metadata(files["int8"])
    assert meta["num_classes"] == 3 and meta["precision"] == "int8"
    assert meta["quantization"]["high_precision"] == "fp16"
    # TensorRT 10: onnxruntime's Q/DQ file, ModelOpt not asked; FP16 comes from the builder flag
    calls.clear()
    files, record = trt_cli.precision_onnx(fp32, cfg, args, "flags")
    assert calls == [] and record["int8_other_layers"] == "fp16 (BuilderFlag.FP16)"
