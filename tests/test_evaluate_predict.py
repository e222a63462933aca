"""The evaluate and predict command lines on real checkpoints and real files."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data_trees import make_voc, save_jpeg
from deeplab import ConfusionMatrix, build_model, load_checkpoint, save_checkpoint
from deeplab.config import DataConfig, ExperimentConfig, ModelConfig
from deeplab.data import build_dataset, normalize
from deeplab.data.synthetic import render
from deeplab.evaluate import main as evaluate_main
from deeplab.inference import predict_logits
from deeplab.palette import boundaries, voc_palette
from deeplab.predict import main as predict_main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synthetic_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ExperimentConfig(model=ModelConfig(backbone="resnet_tiny", num_classes=4, aspp_channels=16),
                           data=DataConfig(synthetic_size=49, synthetic_val=3, synthetic_classes=4))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    save_checkpoint(path, build_model(cfg.model), cfg)
    return path


def test_evaluate_prints_table_and_writes_json_matching_a_direct_evaluation(synthetic_ckpt, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = evaluate_main([str(synthetic_ckpt), "--output-stride", "8", "--flip", "--workers", "0", "-o", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    result = json.loads(out.read_text())
    # Independent: load the checkpoint, run each image at OS 8 with the flipped copy, count with a fresh matrix.
    ckpt = load_checkpoint(synthetic_ckpt)
    model = ckpt.model.eval().set_output_stride(8)
    cm = ConfusionMatrix(4)
    with torch.no_grad():
        for image, mask in build_dataset(ckpt.experiment.data, "val", train=False):
            p = model(image[None]).softmax(1) + model(image[None].flip(-1)).softmax(1).flip(-1)
            cm.update(p.argmax(1)[0], mask)
    assert result["miou"] == pytest.approx(cm.miou())
    assert result["pixels"] == 3 * 49 * 49 and result["output_stride"] == 8 and result["flip"] is True
    assert list(result["iou"]) == ["background", "disc", "square", "triangle"]
    assert "mIoU" in printed.out and "background" in printed.out and "eval: [" in printed.err


def test_evaluate_on_a_voc_folder_given_by_data(tmp_path, capsys):
    make_voc(tmp_path / "data", val=("2007_000033", "2007_000042"))
    ckpt = tmp_path / "voc.ckpt"
    save_checkpoint(ckpt, build_model(ModelConfig(backbone="resnet_tiny", num_classes=21, aspp_channels=16)),
                    ModelConfig(backbone="resnet_tiny", num_classes=21, aspp_channels=16))
    args = [str(ckpt), "--data", str(tmp_path / "data"), "--workers", "0", "-o", str(tmp_path / "voc.json")]
    assert evaluate_main(args + ["--batch-size", "2"]) == 2
    assert "data.val_size" in capsys.readouterr().err
    assert evaluate_main(args + ["--batch-size", "2", "--set", "data.val_size=64", "--scales", "0.75", "1"]) == 0
    result = json.loads((tmp_path / "voc.json").read_text())
    assert result["dataset"] == "voc" and result["images"] == 2 and len(result["iou"]) == 21
    assert result["pixels"] == int(sum((m != 255).sum() for m in _voc_val_masks(tmp_path / "data")))


def _voc_val_masks(root):
    return [np.asarray(Image.open(p)) for p in sorted((root / "VOCdevkit/VOC2012/SegmentationClass").glob("*.png"))
            if p.stem in ("2007_000033", "2007_000042")]


def test_evaluate_errors_are_one_line(synthetic_ckpt, tmp_path, capsys):
    assert evaluate_main([str(tmp_path / "missing.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.ckpt" in err
    make_voc(tmp_path / "voc")
    assert evaluate_main([str(synthetic_ckpt), "--data", str(tmp_path / "voc")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "predicts 4 classes but the voc dataset has 21" in err
    (tmp_path / "results").mkdir()  # -o names a folder: refused before evaluating, nothing written
    assert evaluate_main([str(synthetic_ckpt), "-o", str(tmp_path / "results")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'results'}: "
                                       "cannot write (it is a folder; expected a file name)\n")
    assert list((tmp_path / "results").iterdir()) == []
    assert evaluate_main([str(synthetic_ckpt), "--split", "test"]) == 2  # synthetic data has train and val
    assert capsys.readouterr().err.count("\n") == 1


def test_predict_writes_labels_colors_and_overlay(synthetic_ckpt, tmp_path, capsys):
    images = tmp_path / "in"
    for i in range(2):
        save_jpeg(images / f"scene{i}.jpg", render(0, i, 57, 4, "val")[0])
    out = tmp_path / "out"
    code = predict_main([str(synthetic_ckpt), str(images), str(tmp_path / "nope.jpg"), "-o", str(out), "--flip"])
    assert code == 1 and "nope.jpg: file not found" in capsys.readouterr().err  # the others are still written
    model = load_checkpoint(synthetic_ckpt).model.eval()
    for i in range(2):
        photo = np.asarray(Image.open(images / f"scene{i}.jpg").convert("RGB"))
        expected = predict_logits(model, normalize(photo)[None], flip=True).argmax(1)[0].numpy()
        labels = Image.open(out / f"scene{i}.png")
        assert labels.mode == "L"
        np.testing.assert_array_equal(np.asarray(labels), expected)
        color = Image.open(out / f"scene{i}_color.png")
        assert color.mode == "P" and np.array_equal(np.asarray(color), expected)
        assert np.array_equal(np.array(color.getpalette()[:12]).reshape(4, 3), voc_palette(4))
        over = np.asarray(Image.open(out / f"scene{i}_overlay.png"))
        assert over.shape == photo.shape
        assert np.array_equal(over[expected == 0], photo[expected == 0])  # background shows the photo
        fg = expected > 0
        edge = boundaries(expected) & fg
        blend = (photo.astype(float) * 0.5 + voc_palette(4)[expected].astype(float) * 0.5)
        assert np.abs(over[fg & ~edge] - blend[fg & ~edge]).max() <= 1  # regions: half photo, half colour
        assert np.array_equal(over[edge], voc_palette(4)[expected][edge])  # outlines: the class colour
    assert not list(out.glob(".*tmp"))  # nothing half-written


def test_predict_command_line(synthetic_ckpt, tmp_path):
    save_jpeg(tmp_path / "a.jpg", render(0, 0, 41, 4, "val")[0])
    proc = subprocess.run([sys.executable, "-m", "deeplab.predict", str(synthetic_ckpt), str(tmp_path / "a.jpg"),
                           "-o", str(tmp_path / "o"), "--output-stride", "8"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.png", "a_color.png", "a_overlay.png"]
