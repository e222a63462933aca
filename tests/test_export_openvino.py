"""OpenVINO IR export on a tiny model trained here for a few seconds on synthetic data: FP32 parity with PyTorch,
the metadata round trip in rt_info, INT8 through NNCF within the accuracy gate, and bad files in one line."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deeplab import load_checkpoint, save_checkpoint
from deeplab.cli import UserError
from deeplab.config import ModelConfig, load_config
from deeplab.data.synthetic import class_names
from export import to_openvino
from export.cpu import has_vnni
from export.metadata import read_ir_metadata
from export.model_file import load_runner
from export.runners import OpenVINORunner
from trained import train_tiny

pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def int8_command(ckpt, out, *extra):
    """INT8 (NNCF, accuracy control) as users run it, in its own process. INT8 inference stays out of the test
    process: after it, a process that forked DataLoader workers earlier (other tests did) segfaults at its
    next fork."""
    return subprocess.run([sys.executable, "-m", "export.to_openvino", str(ckpt), "-o", str(out), "--precision",
                           "int8", "--calib-images", "8", "--accuracy-images", "8", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def evaluate_command(model, out) -> dict:
    proc = subprocess.run([sys.executable, "-m", "export.evaluate", str(model), "-o", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def irs(tmp_path_factory):
    d = tmp_path_factory.mktemp("openvino")
    model, cfg = train_tiny()
    ckpt = save_checkpoint(d / "tiny.ckpt", model, cfg, metrics={"val_miou": 0.37})
    assert to_openvino.main([str(ckpt), "-o", str(d / "fp32" / "model.xml")]) == 0
    assert int8_command(ckpt, d / "int8" / "model.xml").returncode == 0
    return {"dir": d, "ckpt": ckpt, "fp32": d / "fp32" / "model.xml", "int8": d / "int8" / "model.xml"}


def test_ir_files_are_written_whole_and_alone(irs):
    for kind in ("fp32", "int8"):
        assert sorted(p.name for p in irs[kind].parent.iterdir()) == ["model.bin", "model.xml"]
    assert not [p for p in irs["dir"].iterdir() if p.name.startswith(".")]  # no temporary file or folder left


@pytest.mark.parametrize("shape", [(1, 3, 49, 49), (2, 3, 81, 65)])
def test_fp32_ir_matches_pytorch(irs, shape):
    model = load_checkpoint(irs["ckpt"]).model.set_output_stride(8).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        ref = model(x).numpy()
    out = OpenVINORunner(irs["fp32"])(x)
    assert out.shape == ref.shape == (shape[0], 4, shape[2], shape[3])
    assert np.abs(out - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.999


def test_runner_compiles_once_per_image_size_for_any_batch_and_keeps_the_callers_model(irs):
    import openvino as ov

    model = ov.Core().read_model(str(irs["fp32"]))
    runner = OpenVINORunner(model, cache=2)
    compiled = []
    compile_model = runner.core.compile_model
    runner.core = type("Core", (), {"compile_model": lambda self, *a: compiled.append(1) or compile_model(*a)})()
    x = np.random.default_rng(0).standard_normal((3, 3, 33, 33)).astype(np.float32)
    alone = [runner(x[i:i + 1]) for i in range(3)]
    together = runner(x)  # a batch of 3 at a size compiled for batch 1: the same compiled model
    assert len(compiled) == 1 and together.shape == (3, 4, 33, 33)
    np.testing.assert_allclose(together, np.concatenate(alone), rtol=1e-4, atol=1e-4)
    for shape in [(1, 3, 49, 49), (2, 3, 33, 33), (1, 3, 65, 65)]:
        assert runner(np.zeros(shape, np.float32)).shape == (shape[0], 4) + shape[2:]
    assert list(runner._compiled) == [(3, 33, 33), (3, 65, 65)]  # the oldest size was dropped
    assert len(compiled) == 3
    assert model.input(0).get_partial_shape().is_dynamic  # the caller's model is not reshaped


def test_metadata_round_trip_in_rt_info(irs):
    meta = read_ir_metadata(irs["fp32"])
    ckpt = load_checkpoint(irs["ckpt"])
    assert meta["num_classes"] == 4 and meta["class_names"] == class_names(4)
    assert meta["output_stride"] == 8 and meta["aspp_rates"] == [12, 24, 36] and meta["val_miou"] == 0.37
    assert ModelConfig(**meta["model_config"]) == ckpt.model.set_output_stride(8).config
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["precision"] == "fp32"
    assert len(meta["parity"]) == 2 and all(r["argmax_agreement"] >= 0.99 for r in meta["parity"])
    runner = load_runner(irs["fp32"], device="cpu")  # the one way every command opens a model file
    assert runner.info.backend == "openvino (CPU)" and runner.info.num_classes == 4
    assert runner.info.output_stride == 8 and runner.info.class_names == class_names(4)
    assert runner.labels(np.zeros((1, 3, 33, 33), np.float32)).shape == (1, 33, 33)


def test_int8_ir_stays_within_the_gate_on_a_trained_model(irs, tmp_path):
    meta = read_ir_metadata(irs["int8"])
    q = meta["quantization"]
    assert meta["precision"] == "int8" and q["calibration_images"] == 8 and q["accuracy_control"] is True
    assert q["cpu_vnni"] == has_vnni() and q["overflow_fix"] == ("first_layer_only" if has_vnni() else "enable")
    limit = load_config().export.max_int8_miou_drop
    # independent of the command's own report: both IRs on the 8 labelled val images their metadata names
    mious = {kind: 100 * evaluate_command(irs[kind], tmp_path / f"{kind}.json")["miou"] for kind in ("fp32", "int8")}
    assert mious["fp32"] > 25  # the model did learn something INT8 could lose
    assert mious["fp32"] - mious["int8"] <= limit
    assert meta["accuracy"]["fp32"]["miou"] == pytest.approx(mious["fp32"])
    assert meta["accuracy"]["int8"]["miou"] == pytest.approx(mious["int8"])
    # the int8 weights are really int8: the bin is much smaller
    assert irs["int8"].with_suffix(".bin").stat().st_size < 0.5 * irs["fp32"].with_suffix(".bin").stat().st_size


def test_gate_refuses_a_loss_above_the_limit_and_writes_nothing(irs, tmp_path):
    proc = int8_command(irs["ckpt"], tmp_path / "model.xml", "--set", "export.max_int8_miou_drop=-1000")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and re.match(r"error: INT8 loses -?\d+\.\d+ mIoU points .* --force",
                                             err[-1]), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no IR, no temporary file or folder


def test_bad_or_mismatched_files_are_one_line(irs, tmp_path):
    lone = tmp_path / "lone.xml"
    lone.write_bytes(irs["fp32"].read_bytes())  # no .bin beside it
    with pytest.raises(UserError, match="lone.xml: an OpenVINO IR needs lone.xml and lone.bin"):
        load_runner(lone)
    for name, text, words in (("garbage.xml", "<net>not really</net>", "its XML root is <net>, not <net version"),
                              ("page.xml", "<html><body/></html>", "its XML root is <html>"),
                              ("broken.xml", "<net version='11'", "not well-formed XML"),
                              ("empty.xml", "<?xml version='1.0'?><net version='11'/>", "no deeplab.* metadata")):
        path = tmp_path / name
        path.write_text(text)
        path.with_suffix(".bin").write_bytes(b"\0" * 16)
        with pytest.raises(UserError, match=re.escape(name) + ": .*" + re.escape(words)) as e:
            load_runner(path)
        assert "\n" not in str(e.value)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    for args, words in (([str(bad)], "bad.onnx"), ([str(irs["ckpt"]), "--precision", "fp16"], "fp32 or int8")):
        proc = subprocess.run([sys.executable, "-m", "export.to_openvino", *args, "-o", str(tmp_path / "m.xml")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "m.xml").exists() and not (tmp_path / "m.bin").exists()
