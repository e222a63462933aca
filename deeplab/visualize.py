"""What a model learned, as one picture: a few validation images, one row each, as
image | ground truth | prediction (both in the dataset's palette over the photo in grey). The demo writes it
as a PNG, the training loop sends it to TensorBoard at each evaluation.

``prediction_grid(images, masks, predictions, palette)`` lays the panels out (a title strip, rows x 3 panels
each the image's size times ``scale``, a legend: `grid_size`); ``validation_grid(model, dataset, palette)``
predicts the first images of a dataset and lays them out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data import denormalize
from .fileio import atomic_path
from .inference import model_predictor
from .palette import overlay

GRID_IMAGES = 4  # rows in the demo picture and the TensorBoard grid
GAP = 2  # white pixels between panels and rows
TITLE_HEIGHT = 20  # the strip above the panels naming the columns


def _enlarge(picture: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling: class borders stay sharp in a small synthetic image."""
    return picture if scale == 1 else picture.repeat(scale, axis=0).repeat(scale, axis=1)


def _grey(image: np.ndarray) -> np.ndarray:
    """The photo in grey (HxWx3): class colours over it stay readable whatever the photo's own colours."""
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(np.clip(luma + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def _titles(grid: np.ndarray, titles: Sequence[str], width: int) -> None:
    """Each column's title, centred in the white strip at the top of ``grid`` (drawn in place)."""

    strip = Image.fromarray(grid[:TITLE_HEIGHT])
    draw = ImageDraw.Draw(strip)
    for size in (13, 11, 9):  # the largest that fits a panel (96 px synthetic images at scale 1)
        font = ImageFont.load_default(size=size)
        if all(draw.textlength(title, font=font) <= width for title in titles):
            break
    for col, title in enumerate(titles):
        left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
        x = col * (width + GAP) + max(0, (width - (right - left)) // 2)
        draw.text((x, (TITLE_HEIGHT - (bottom - top)) // 2 - top), title, fill=(0, 0, 0), font=font)
    grid[:TITLE_HEIGHT] = np.asarray(strip)


def _legend(grid: np.ndarray, names: Sequence[str], palette: np.ndarray) -> None:
    """A swatch and the name of every class but the first (background: the photo shows through), in the
    white strip at the bottom of ``grid`` (drawn in place)."""

    strip = Image.fromarray(grid[-TITLE_HEIGHT:])
    draw, font, x = ImageDraw.Draw(strip), ImageFont.load_default(size=13), 4
    for k, name in list(enumerate(names))[1:]:
        draw.rectangle((x, 5, x + 10, 15), fill=tuple(int(c) for c in palette[k]))
        draw.text((x + 14, 3), name, fill=(0, 0, 0), font=font)
        x += 14 + int(draw.textlength(name, font=font)) + 12
    grid[-TITLE_HEIGHT:] = np.asarray(strip)


def grid_size(rows: int, height: int, width: int, legend: bool = False) -> tuple:
    """(height, width) of a grid of ``rows`` rows of three height x width panels, titles, gaps and the
    legend strip (when class names are given) included."""
    return TITLE_HEIGHT * (2 if legend else 1) + rows * height + (rows - 1) * GAP, 3 * width + 2 * GAP


def prediction_grid(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], predictions: Sequence[np.ndarray],
                    palette: np.ndarray, ignore_index: int = 255, alpha: float = 0.6, scale: int = 1,
                    titles: Sequence[str] = ("image", "ground truth", "prediction"),
                    names: Optional[Sequence[str]] = None) -> np.ndarray:
    """HxWx3 uint8 images, HxW ground truths and predictions -> one uint8 RGB picture (`grid_size`): a title
    strip, then one row per image: the image | its ground truth | the prediction, both in the palette over
    the image in grey; panels are enlarged ``scale`` times, smaller images padded with white. ``names``:
    the class names, drawn as a colour legend below."""
    if not len(images) == len(masks) == len(predictions) or not images:
        raise ValueError(f"need as many images, masks and predictions (>= 1), got {len(images)}, {len(masks)}, "
                         f"{len(predictions)}")
    h = max(i.shape[0] for i in images) * scale
    w = max(i.shape[1] for i in images) * scale
    grid = np.full(grid_size(len(images), h, w, legend=names is not None) + (3,), 255, np.uint8)
    for row, (image, mask, pred) in enumerate(zip(images, masks, predictions)):
        grey = _grey(image)
        panels = (image, overlay(grey, mask, palette, alpha, ignore_index),
                  overlay(grey, pred, palette, alpha, ignore_index))
        top = TITLE_HEIGHT + row * (h + GAP)
        for col, panel in enumerate(panels):
            panel = _enlarge(panel, scale)
            grid[top: top + panel.shape[0], col * (w + GAP): col * (w + GAP) + panel.shape[1]] = panel
    _titles(grid, titles, w)
    if names is not None:
        _legend(grid, names, palette)
    return grid


@torch.no_grad()
def validation_grid(model, dataset, palette: np.ndarray, count: int = GRID_IMAGES, output_stride: Optional[int] = 8,
                    ignore_index: int = 255, amp: Optional[torch.dtype] = None, scale: int = 1,
                    names: Optional[Sequence[str]] = None) -> np.ndarray:
    """The grid of the first ``count`` (image, mask) pairs of ``dataset`` predicted by ``model`` at
    ``output_stride`` (same weights; the model's own stride and train/eval modes are put back)."""
    predict = model_predictor(model, output_stride=output_stride, amp=amp)
    images, masks, predictions = [], [], []
    for i in range(min(count, len(dataset))):
        image, mask = dataset[i]
        predictions.append(predict(image[None]).argmax(1)[0].cpu().numpy())
        images.append(denormalize(image))
        masks.append(np.asarray(mask))
    stride = f" at OS{output_stride}" if output_stride else ""
    return prediction_grid(images, masks, predictions, palette, ignore_index, scale=scale,
                           titles=("image", "ground truth", f"prediction{stride}"), names=names)


def write_png(path, picture: np.ndarray) -> Path:
    """An HxWx3 uint8 array as an RGB PNG, written atomically."""

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG", optimize=True)
    return path
