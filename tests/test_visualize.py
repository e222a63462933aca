"""The picture of what a model learned (deeplab/visualize.py): its layout against hand-made panels, the
prediction at OS8 against a plain forward pass, TensorBoard's copy at each evaluation of the training loop,
and the demo's PNG named on its last console line (one real run on a tiny config)."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab import ModelConfig, build_model
from deeplab.config import load_config
from deeplab.data import build_dataset, dataset_info, denormalize
from deeplab.palette import voc_palette
from deeplab.train_loop import Worker, train
from deeplab.visualize import GAP, TITLE_HEIGHT, grid_size, prediction_grid, validation_grid, write_png

ROOT = Path(__file__).resolve().parents[1]


def _blend(grey_pixel, colour, alpha=0.6):
    return np.floor(np.asarray(grey_pixel, np.float64) * (1 - alpha) + np.asarray(colour) * alpha + 0.5)


def grey_of(pixel):
    """ITU-R 601 luma, rounded: the photo in grey under the class colours."""
    return np.floor(pixel.astype(np.float64) @ [0.299, 0.587, 0.114] + 0.5)


def test_grid_is_rows_of_three_panels_with_titles_gaps_and_legend():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (10, 12, 3), dtype=np.uint8) for _ in range(3)]
    masks = [np.zeros((10, 12), np.int64) for _ in range(3)]
    preds = [np.zeros((10, 12), np.int64) for _ in range(3)]
    masks[1][2:8, 3:9] = 2  # a 6x6 square of class 2 in the second row's ground truth
    palette = voc_palette(4)
    grid = prediction_grid(images, masks, preds, palette, scale=2, names=["bg", "a", "b", "c"])
    assert grid.shape == (TITLE_HEIGHT + 3 * 20 + 2 * GAP + TITLE_HEIGHT, 3 * 24 + 2 * GAP, 3)
    assert grid.shape[:2] == grid_size(3, 20, 24, legend=True)
    assert grid_size(3, 20, 24) == (grid.shape[0] - TITLE_HEIGHT, grid.shape[1])  # without the legend
    for row in range(3):
        top = TITLE_HEIGHT + row * (20 + GAP)
        image = images[row].repeat(2, 0).repeat(2, 1)
        np.testing.assert_array_equal(grid[top:top + 20, :24], image)  # column 1: the photo itself
        assert (grid[top:top + 20, 24:24 + GAP] == 255).all()  # white gap between the panels
    top = TITLE_HEIGHT + 20 + GAP  # row 2: the square's inside is class 2's colour over the photo in grey
    grey = grey_of(images[1][4, 5])
    np.testing.assert_array_equal(grid[top + 2 * 4, 24 + GAP + 2 * 5], _blend([grey] * 3, palette[2]))
    np.testing.assert_array_equal(grid[top, 24 + GAP], [grey_of(images[1][0, 0])] * 3)  # background: grey photo
    np.testing.assert_array_equal(grid[top + 2 * 4, 2 * (24 + GAP) + 2 * 5], [grey] * 3)  # prediction: background
    assert (grid[:TITLE_HEIGHT] < 128).any() and (grid[-TITLE_HEIGHT:] < 128).any()  # titles and legend drawn
    with pytest.raises(ValueError, match="as many images"):
        prediction_grid(images, masks[:2], preds, palette)


def test_validation_grid_predicts_at_os8_and_puts_the_model_back(tmp_path):
    cfg = load_config(None, ["data.synthetic_classes=4", "data.synthetic_size=49", "data.synthetic_val=3"]).data
    dataset = build_dataset(cfg, cfg.val_split, train=False)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet_tiny", num_classes=4, aspp_channels=16)).train()
    assert model.output_stride == 16
    palette = dataset_info(cfg).palette
    grid = validation_grid(model, dataset, palette, count=2)
    assert model.output_stride == 16 and model.training  # stride and mode put back
    reference = copy.deepcopy(model).eval()
    reference.set_output_stride(8)
    pairs = [dataset[i] for i in range(2)]
    with torch.no_grad():
        preds = [reference(image[None]).argmax(1)[0].numpy() for image, _ in pairs]
    expected = prediction_grid([denormalize(i) for i, _ in pairs], [m.numpy() for _, m in pairs], preds, palette,
                               titles=("image", "ground truth", "prediction at OS8"))
    np.testing.assert_array_equal(grid, expected)
    path = write_png(tmp_path / "grid.png", grid)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)  # lossless, RGB


def test_tensorboard_gets_the_grid_at_each_evaluation_and_training_is_unchanged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    cfg = load_config(None, [
        "model.backbone=resnet_tiny", "model.aspp_channels=16", "model.num_classes=4",
        "data.synthetic_classes=4", "data.synthetic_size=49", "data.crop_size=33",
        "data.synthetic_train=4", "data.synthetic_val=2", "data.loader_workers=0",
        "train.batch_size=2", "train.max_iterations=4", "train.eval_interval=2", "train.log_interval=100",
        "train.lr=0.01", "train.amp=off"]).check()
    logged, plain = [], []
    train(cfg, Worker(log_dir=str(tmp_path / "tb"), report=lambda m, c: logged.append(m)))
    train(cfg, Worker(report=lambda m, c: plain.append(m)))
    assert [m["val_miou"] for m in logged] == [m["val_miou"] for m in plain]  # drawing changes nothing
    assert [m["loss"] for m in logged] == [m["loss"] for m in plain]
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={IMAGES: 0})
    events.Reload()
    assert "val/predictions_os8" in events.Tags()["images"]
    shots = events.Images("val/predictions_os8")
    assert [s.step for s in shots] == [2, 4]
    assert (shots[-1].height, shots[-1].width) == grid_size(2, 49, 49, legend=True)


@pytest.mark.slow
def test_demo_writes_the_picture_and_names_it_on_the_last_line(tmp_path):
    """The demo end to end on a tiny config (real local Ray, 1 worker, 4 iterations, no export)."""
    sets = ["model.backbone=resnet_tiny", "model.aspp_channels=16", "data.synthetic_size=49", "data.crop_size=33",
            "data.synthetic_train=8", "data.synthetic_val=4", "train.batch_size=2", "train.max_iterations=4",
            "train.eval_interval=4", "train.log_interval=2", "train.amp=off", "cluster.num_workers=1",
            f"cluster.storage_path={tmp_path}", "cluster.name=tiny"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "cluster.demo", "--skip-export", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    picture = tmp_path / "tiny" / "predictions_os8.png"
    assert last.endswith(str(picture)) and "prediction at output stride 8" in last
    with Image.open(picture) as im:
        assert im.mode == "RGB" and (im.height, im.width) == grid_size(4, 2 * 49, 2 * 49, legend=True)
