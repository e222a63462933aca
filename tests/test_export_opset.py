"""export.opset against what the backend that reads the file parses: TensorRT 10.0 up to 20 (its documented
range), onnxruntime and OpenVINO as installed (asked with a real one-node model). One line, before any export."""
import pytest

from deeplab import build_model, save_checkpoint
from deeplab.config import ConfigError, load_config
from export import to_onnx, to_tensorrt
from export.opset import TENSORRT_MAX_OPSET, _identity_model, check_opset, exporter_default


def _onnxruntime_loads(opset: int) -> bool:
    import onnxruntime as ort

    try:
        ort.InferenceSession(_identity_model(opset), providers=["CPUExecutionProvider"])
        return True
    except Exception:
        return False


def test_tensorrt_parses_up_to_opset_20_and_the_default_is_capped_there():
    assert TENSORRT_MAX_OPSET == 20
    assert check_opset(17, "tensorrt") == 17 and check_opset(20, "tensorrt") == 20
    assert check_opset(None, "tensorrt") == min(exporter_default(), 20)
    with pytest.raises(ConfigError) as e:
        check_opset(21, "tensorrt")
    assert str(e.value) == "export.opset=21: TensorRT 10.0 parses opsets up to 20; use --opset 20 or lower"


def test_onnxruntime_bound_is_what_the_installed_version_loads():
    newest = max(n for n in range(11, 40) if _onnxruntime_loads(n))  # the installed runtime, asked directly
    assert check_opset(newest, "onnxruntime") == newest
    with pytest.raises(ConfigError, match=rf"^export.opset={newest + 1}: the installed onnxruntime .* does not "
                                          rf"load opset {newest + 1} .*; use a lower --opset$"):
        check_opset(newest + 1, "onnxruntime")
    assert check_opset(None, "onnxruntime") == exporter_default()
    assert check_opset(None, "openvino") == exporter_default()  # OpenVINO's reader loads it (it falls back per op)


def test_converters_refuse_a_backend_opset_in_one_line_before_writing(tmp_path, tiny_model_config, capsys):
    cfg = load_config(None, ["model.backbone=resnet_tiny", "model.num_classes=5", "model.aspp_channels=16",
                             "data.synthetic_classes=5"])
    ckpt = save_checkpoint(tmp_path / "m.ckpt", build_model(tiny_model_config), cfg)
    assert to_tensorrt.main([str(ckpt), "--opset", "21", "-o", str(tmp_path / "m.engine")]) == 2
    assert capsys.readouterr().err.strip() == ("error: export.opset=21: TensorRT 10.0 parses opsets up to 20; "
                                               "use --opset 20 or lower")
    assert to_onnx.main([str(ckpt), "--opset", "99", "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: export.opset=99: the installed onnxruntime") and len(err.splitlines()) == 1
    # an ONNX file stamped with an opset TensorRT does not parse is named, not handed to the parser
    (tmp_path / "o23.onnx").write_bytes(_identity_model(23))
    assert to_tensorrt.main([str(tmp_path / "o23.onnx")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'o23.onnx'}: ONNX opset 23: TensorRT 10.0 "
                                               "parses opsets up to 20; export it again with --opset 20 or lower")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt", "o23.onnx"]
