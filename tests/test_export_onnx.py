"""ONNX export, INT8/FP16 variants and the to_tensorrt CPU path, on a tiny model with small synthetic images.

One real `python -m export.to_tensorrt CKPT --precision int8` run (module fixture) exports the checkpoint at
output stride 8, quantizes it and, with no GPU here, stops with exit code 2: the other tests check the files
it left against PyTorch and against plain numpy references.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from deeplab import ModelConfig, build_model, load_checkpoint, save_checkpoint
from deeplab.config import DataConfig
from deeplab.data import synthetic
from export import precision as prec
from export import to_tensorrt
from export.metadata import read_metadata
from export.runners import OnnxRunner
from export.samples import labelled_batches
from export.to_onnx import ExportError, check_parity

ROOT = Path(__file__).resolve().parents[1]
DATA = {"synthetic_size": 65, "synthetic_classes": 6, "synthetic_train": 8, "synthetic_val": 6}
DATA_SETS = [a for k, v in DATA.items() for a in ("--set", f"data.{k}={v}")]


def _randomize_bn(model):
    """Non-trivial BatchNorm statistics, so folding BN into the convs is really exercised."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet_tiny", aspp_channels=16, num_classes=6)  # trained at OS16
    model = _randomize_bn(build_model(cfg)).eval()
    ckpt = save_checkpoint(d / "tiny.ckpt", model, cfg, iteration=3, metrics={"val_miou": 0.5})
    out = d / "out"
    proc = subprocess.run([sys.executable, "-m", "export.to_tensorrt", str(ckpt), "--precision", "int8",
                           "--calib-images", "4", "-o", str(out / "model.engine"), *DATA_SETS],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    return {"dir": d, "ckpt": ckpt, "out": out, "proc": proc}


def test_to_tensorrt_without_gpu_exits_2_with_one_line_and_keeps_cpu_artifacts(exported):
    proc, out = exported["proc"], exported["out"]
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot build a TensorRT engine here"), proc.stderr
    assert "tensorrt is not installed" in lines[0] or "no CUDA GPU" in lines[0]
    # the CPU-side artifacts are there, the engine (and any half-written file) is not
    assert sorted(p.name for p in out.iterdir()) == ["model.int8.onnx", "model.onnx"]
    assert "argmax agreement" in proc.stdout  # parity was printed


def test_onnx_is_dynamic_at_output_stride_8_with_metadata(exported):
    model = onnx.load(str(exported["out"] / "model.onnx"))
    onnx.checker.check_model(model)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True] and dims[1].dim_value == 3
    meta = read_metadata(model)
    assert meta["output_stride"] == 8 and meta["aspp_rates"] == [12, 24, 36] and meta["multi_grid"] == [1, 2, 4]
    assert meta["num_classes"] == 6 and meta["class_names"] == synthetic.class_names(6)
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert meta["val_miou"] == 0.5
    ckpt = load_checkpoint(exported["ckpt"])
    assert ModelConfig(**meta["model_config"]) == ckpt.model.set_output_stride(8).config
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)  # folded


@pytest.mark.parametrize("shape", [(2, 3, 65, 65), (2, 3, 97, 81)])
def test_onnxruntime_matches_pytorch(exported, shape):
    model = load_checkpoint(exported["ckpt"]).model.set_output_stride(8).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        ref = model(x).numpy()
    out = OnnxRunner(exported["out"] / "model.onnx")(x)
    assert out.shape == ref.shape == (shape[0], 6, shape[2], shape[3])
    assert np.abs(out - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.999


def test_parity_check_fails_above_tolerance():
    good = {"shape": [2, 3, 65, 65], "max_abs_diff": 1e-5, "max_abs_logit": 20.0, "argmax_agreement": 1.0}
    check_parity([good], 1e-3)
    with pytest.raises(ExportError, match="max \\|diff\\| 0.1"):
        check_parity([{**good, "max_abs_diff": 0.1}], 1e-3)
    with pytest.raises(ExportError, match="argmax agreement 0.9"):
        check_parity([{**good, "argmax_agreement": 0.9}], 1e-3)


def qdq_summary(onnx_path) -> dict:
    """Q/DQ node counts and the zero points that are not 0 (TensorRT accepts only symmetric, zero point 0)."""
    model = onnx.load(str(onnx_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consts = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    nonzero, dtypes, per_channel = [], set(), 0
    for n in q + dq:
        if len(n.input) > 2:
            zp = inits.get(n.input[2], consts.get(n.input[2]))
            if zp is not None:
                dtypes.add(str(zp.dtype))
                if np.any(zp != 0):
                    nonzero.append(n.name)
        scale = inits.get(n.input[1], consts.get(n.input[1]))
        if scale is not None and scale.size > 1:
            per_channel += 1
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return {"quantize": len(q), "dequantize": len(dq), "nonzero_zero_points": sorted(set(nonzero)),
            "zero_point_dtypes": sorted(dtypes), "per_channel_nodes": per_channel, "conv": len(convs)}


def test_int8_qdq_is_symmetric_per_channel_and_runs(exported):
    path = exported["out"] / "model.int8.onnx"
    s = qdq_summary(path)
    assert s["quantize"] > 0 and s["dequantize"] >= s["quantize"]
    assert s["nonzero_zero_points"] == [] and s["zero_point_dtypes"] == ["int8"]  # what TensorRT requires
    assert s["per_channel_nodes"] >= s["conv"]  # every conv weight has one scale per output channel
    meta = read_metadata(path)
    assert meta["precision"] == "int8" and meta["quantization"]["calibration_images"] == 4
    assert meta["output_stride"] == 8  # the FP32 model's metadata is kept
    out = OnnxRunner(path)(np.zeros((2, 3, 65, 65), np.float32))
    assert out.shape == (2, 6, 65, 65) and np.isfinite(out).all()


def _naive_miou(preds, masks, num_classes, ignore=255):
    """mIoU from scratch: per class |pred & gt| / |pred | gt| over valid pixels, mean over classes seen."""
    ious = []
    for c in range(num_classes):
        inter = union = 0
        for p, m in zip(preds, masks):
            valid = m != ignore
            inter += np.sum((p == c) & (m == c) & valid)
            union += np.sum(((p == c) | (m == c)) & valid)
        if union:
            ious.append(inter / union)
    return 100 * float(np.mean(ious))


def test_fp16_and_int8_accuracy_measured_in_onnxruntime(exported, tmp_path):
    fp32, int8 = exported["out"] / "model.onnx", exported["out"] / "model.int8.onnx"
    fp16, used = prec.lowp_onnx(fp32, tmp_path / "model.fp16.onnx", "fp16")
    assert used in ("onnxruntime.float16", "modelopt.autocast")
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(str(fp16)).graph.initializer)
    data = DataConfig(**DATA)
    batches = labelled_batches(data, "val", 6)
    report = prec.accuracy_report({"fp32": fp32, "fp16": fp16, "int8": int8}, batches, 6)
    runner = OnnxRunner(fp32)
    preds = [runner(img).argmax(1)[0] for img, _ in batches]
    assert report["fp32"]["miou"] == pytest.approx(_naive_miou(preds, [m[0].numpy() for _, m in batches], 6))
    assert report["fp16"]["agreement"] >= 0.99 and abs(report["fp16"]["miou_drop"]) < 1.0
    assert 0 <= report["int8"]["agreement"] <= 1
    assert report["int8"]["miou_drop"] == pytest.approx(report["fp32"]["miou"] - report["int8"]["miou"])


def test_bf16_onnx_without_modelopt_says_so(exported, tmp_path):
    if prec.modelopt_autocast() is not None:
        pytest.skip("ModelOpt is installed here")
    with pytest.raises(ValueError, match="ModelOpt AutoCast"):
        prec.lowp_onnx(exported["out"] / "model.onnx", tmp_path / "m.bf16.onnx", "bf16")
    assert not (tmp_path / "m.bf16.onnx").exists()


def test_check_accuracy_refuses_int8_drop_unless_forced(exported, tmp_path, capsys):
    src = tmp_path / "model.onnx"
    src.write_bytes((exported["out"] / "model.onnx").read_bytes())
    common = [str(src), "--precision", "int8", "--calib-images", "2", "--check-accuracy", "--accuracy-images", "2",
              "-o", str(tmp_path / "model.engine"), *DATA_SETS]
    # a threshold no model can meet (a drop > -1000 points) must refuse the build
    rc = to_tensorrt.main(common + ["--set", "export.max_int8_miou_drop=-1000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "INT8 loses" in err[0] and "--force" in err[0]
    assert not list(tmp_path.glob("*.engine*"))
    rc = to_tensorrt.main(common + ["--set", "export.max_int8_miou_drop=-1000", "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "model.int8.onnx" in err[0]
    assert not list(tmp_path.glob("*.engine*"))


def test_cli_errors_are_one_line(exported, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not onnx either")
    # a bad file or a config value that is not allowed is a usage error (2), named by its file or field
    for cmd, rc, words in (
            (["export.to_onnx", str(bad)], 2, "bad.ckpt"),
            (["export.to_tensorrt", str(tmp_path / "missing.onnx")], 2, "missing.onnx: no such file"),
            (["export.to_tensorrt", str(onnx_file), "--opt-shape", "1x3x9999x513"], 2, "H must satisfy min <= opt"),
            (["export.to_tensorrt", str(onnx_file), "--precision", "fp8"], 2, "export.precision='fp8' is unknown")):
        proc = subprocess.run([sys.executable, "-m", *cmd, "-o", str(tmp_path / "x.out")], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == rc, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr
        assert proc.stderr.startswith("error: "), proc.stderr
        assert not (tmp_path / "x.out").exists()
    # an output folder that is a file: one line naming it, nothing written
    proc = subprocess.run([sys.executable, "-m", "export.to_onnx", str(exported["ckpt"]), "-o", str(bad / "m.onnx")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {bad}: cannot write (it is a file; expected a folder)"], proc.stderr


def test_shorthand_flags_are_config_overrides_with_the_checkpoint_as_base(exported, tmp_path, capsys):
    from export import to_onnx

    out = tmp_path / "static.onnx"
    rc = to_onnx.main([str(exported["ckpt"]), "-o", str(out), "--static", "--parity-size", "65", "--parity-batch", "1",
                       "--output-stride", "16", "--set", "export.tolerance=0.01"])
    printed = capsys.readouterr().out
    assert rc == 0 and "argmax agreement" in printed and f"wrote {out}" in printed
    model = onnx.load(str(out))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 65, 65]  # --static: export.dynamic=false, at the parity size
    meta = read_metadata(model)
    assert meta["output_stride"] == 16 and meta["class_names"] == synthetic.class_names(6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["static.onnx"]


def test_calibration_images_from_a_folder_or_the_dataset(tmp_path):
    from PIL import Image

    from deeplab.data import normalize
    from export.samples import calibration_images

    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(3)]
    (tmp_path / "sub").mkdir()
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / ("sub" if i else ".") / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    images = calibration_images(None, 2, 33, folder=tmp_path)
    assert [x.shape for x in images] == [(1, 3, 33, 33)] * 2
    expected = normalize(np.asarray(Image.fromarray(pixels[0]).resize((33, 33), Image.BILINEAR)))[None].numpy()
    np.testing.assert_allclose(images[0], expected)  # img0.png sorts first, resized then normalized
    data = DataConfig(**DATA)
    own_size = calibration_images(data, 2)
    assert [x.shape for x in own_size] == [(1, 3, 65, 65)] * 2
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ValueError, match="broken.png"):
        calibration_images(None, 5, 33, folder=tmp_path)
    with pytest.raises(ValueError, match="img1.png: not a folder"):
        calibration_images(None, 2, 33, folder=tmp_path / "sub" / "img1.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no images"):
        calibration_images(None, 2, 33, folder=tmp_path / "empty")


def test_int8_reduce_range_keeps_weights_in_7_bits_and_says_so(exported, tmp_path):
    """Without VNNI, u8 x s8 products saturate int16: 7-bit weights (reduce_range) avoid it. Each file records
    the choice; the weights show it."""
    from onnx import numpy_helper

    calib = [img.numpy() for img, _ in labelled_batches(DataConfig(**DATA), "train", 2)]
    peaks = {}
    for reduce in (False, True):
        path = prec.quantize_int8(exported["out"] / "model.onnx", tmp_path / f"rr{int(reduce)}.onnx", calib,
                                  reduce_range=reduce)
        q = read_metadata(path)["quantization"]
        assert q["reduce_range"] is reduce and q["cpu_vnni"] is (not prec.cpu_reduce_range())
        weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
                   if t.data_type == onnx.TensorProto.INT8 and t.dims and len(t.dims) == 4]
        assert weights
        peaks[reduce] = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert peaks[False] == 127 and peaks[True] <= 64
