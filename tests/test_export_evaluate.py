"""export.evaluate and export.predict: an exported model (ONNX, OpenVINO IR) judged exactly like its checkpoint,
through the same evaluator, table, JSON and pictures, with its classes and dataset from its own metadata."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deeplab import save_checkpoint
from deeplab.data.synthetic import render
from deeplab.evaluate import main as deeplab_evaluate
from deeplab.predict import main as deeplab_predict
from export import to_onnx, to_openvino
from export.evaluate import main as export_evaluate
from export.predict import main as export_predict
from trained import train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
SAME_RUN = ("iou", "miou", "pixel_accuracy", "dataset", "root", "split", "images", "output_stride", "scales", "flip",
            "window")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("exported")
    model, cfg = train_tiny()
    ckpt = save_checkpoint(d / "tiny.ckpt", model, cfg)  # trained at output stride 16
    assert to_onnx.main([str(ckpt), "-o", str(d / "model.onnx"), "--output-stride", "8"]) == 0
    files = {"ckpt": ckpt, "onnx": d / "model.onnx"}
    try:
        import openvino  # noqa: F401
    except ImportError:
        return files
    assert to_openvino.main([str(d / "model.onnx"), "-o", str(d / "model.xml")]) == 0  # from the ONNX: one export
    return {**files, "xml": d / "model.xml"}


def _evaluate(main, model, out, *extra) -> dict:
    assert main([str(model), "-o", str(out), *extra]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("kind", ["onnx", "xml"])
def test_exported_model_scores_what_its_checkpoint_scores(models, kind, tmp_path, capsys):
    if kind not in models:
        pytest.skip("openvino is not installed")
    ref = _evaluate(deeplab_evaluate, models["ckpt"], tmp_path / "ckpt.json", "--output-stride", "8")
    capsys.readouterr()
    got = _evaluate(export_evaluate, models[kind], tmp_path / f"{kind}.json")  # dataset from the file's metadata
    printed = capsys.readouterr().out
    assert ref["miou"] > 0.25  # a trained model: the comparison means something
    assert abs(got["miou"] - ref["miou"]) <= 1e-6
    assert got["iou"] == pytest.approx(ref["iou"], abs=1e-6)
    assert got["pixel_accuracy"] == pytest.approx(ref["pixel_accuracy"], abs=1e-6)
    assert {k: got[k] for k in SAME_RUN[3:]} == {k: ref[k] for k in SAME_RUN[3:]}  # same data, stride, options
    assert got["model"] == str(models[kind]) and got["precision"] == "fp32"
    assert got["backend"].startswith("onnxruntime" if kind == "onnx" else "openvino")
    assert "mIoU" in printed and "background" in printed  # the same per-class table


@pytest.mark.parametrize("kind", ["onnx", "xml"])
def test_multi_scale_and_flip_as_for_the_checkpoint(models, kind, tmp_path):
    """The exported model's multi-scale resizes use the align_corners its checkpoint uses (from its metadata):
    the paper's scales with flips score what the checkpoint scores, not merely close to it."""
    if kind not in models:
        pytest.skip("openvino is not installed")
    opts = ("--scales", "0.5", "0.75", "1.25", "1.75", "--flip")
    ref = _evaluate(deeplab_evaluate, models["ckpt"], tmp_path / "ckpt.json", "--output-stride", "8", *opts)
    got = _evaluate(export_evaluate, models[kind], tmp_path / f"{kind}.json", *opts)
    assert got["scales"] == [0.5, 0.75, 1.25, 1.75] and got["flip"] is True
    assert ref["miou"] > 0.25
    assert abs(got["miou"] - ref["miou"]) <= 1e-6
    assert got["iou"] == pytest.approx(ref["iou"], abs=1e-6)


def test_predict_writes_the_same_pictures_as_for_the_checkpoint(models, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        image, _ = render(7, i, 49, 4, "val")
        Image.fromarray(image).save(images / f"street{i}.png")
    assert deeplab_predict([str(models["ckpt"]), str(images), "-o", str(tmp_path / "ckpt"),
                            "--output-stride", "8"]) == 0
    assert export_predict([str(models["onnx"]), str(images), "-o", str(tmp_path / "onnx")]) == 0
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "onnx").iterdir()) and len(names) == 6
    for name in names:
        a, b = (np.asarray(Image.open(tmp_path / d / name)) for d in ("ckpt", "onnx"))
        assert a.shape == b.shape and (a == b).mean() >= 0.999


def test_mistakes_are_one_line(models, tmp_path):
    bare = tmp_path / "bare.onnx"
    import onnx

    model = onnx.load(str(models["onnx"]))
    del model.metadata_props[:]
    onnx.save(model, str(bare))
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    for cmd, words in ((["export.evaluate", str(models["onnx"]), "--output-stride", "16"],
                        "exported at output stride 8"),
                       (["export.evaluate", str(models["ckpt"])], "deeplab.evaluate"),
                       (["export.evaluate", str(bare)], "no deeplab.* metadata"),
                       (["export.evaluate", str(tmp_path / "junk.onnx")], "junk.onnx: not a readable ONNX file"),
                       (["export.predict", str(tmp_path / "missing.xml"), "x.png", "-o", str(tmp_path / "p")],
                        "missing.xml: no such model file")):
        proc = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "p").exists()
