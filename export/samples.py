"""Images that export feeds its models: labelled batches for accuracy checks, real images for parity checks,
calibration images for INT8, from the config's dataset or a plain folder.

A labelled batch is ``(images (1, 3, H, W) float32 normalized, masks (1, H, W) int64)`` at the image's own
size: what ``deeplab.inference.evaluate`` takes. Calibration images are (1, 3, H, W) float32 numpy arrays.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from deeplab.data import DatasetError, build_dataset, normalize, read_image
from deeplab.data.datasets import IMAGE_SUFFIXES


def labelled_batches(data_cfg, split: str, n: int, start: int = 0) -> list:
    """Up to n labelled one-image batches from the data package's evaluation dataset."""

    ds = build_dataset(data_cfg, split, train=False)
    out = []
    for i in range(start, min(len(ds), start + n)):
        image, mask = ds[i][:2]
        out.append((torch.as_tensor(image).unsqueeze(0).float(), torch.as_tensor(mask).unsqueeze(0).long()))
    if not out:
        raise DatasetError(f"data split {split!r} has no images for calibration/accuracy")
    return out


def sample_images(data_cfg, split: str, n: int, size: int) -> Optional[torch.Tensor]:
    """n real images resized to size x size (bilinear, normalized), or None if the dataset does not load."""
    try:
        batches = labelled_batches(data_cfg, split, n)
    except Exception:
        return None
    x = F.interpolate(torch.cat([img for img, _ in batches]), size=(size, size), mode="bilinear",
                      align_corners=False)
    if len(x) < n:
        x = x.repeat((n + len(x) - 1) // len(x), 1, 1, 1)[:n]
    return x


def parity_inputs(sizes, batch: int = 2, data_cfg=None, seed: int = 0) -> list:
    """One batch per size: real images from the dataset when it loads, else seeded noise."""
    inputs = []
    for size in sizes:
        x = sample_images(data_cfg, "val", batch, size) if data_cfg is not None else None
        if x is None:
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + size))
        inputs.append(x)
    return inputs


def folder_images(folder, n: int, size: int) -> list:
    """Calibration images from a plain folder (no labels): n files, resized to size x size, normalized."""

    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"--calib-data {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
    if not files:
        raise DatasetError(f"--calib-data {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for f in files:
        image = Image.fromarray(read_image(f)).resize((size, size), Image.BILINEAR)
        out.append(normalize(np.asarray(image))[None].numpy())
    return out


def calibration_images(data_cfg, n: int, size: Optional[int] = None, folder=None) -> list:
    """INT8 calibration images: n files of ``folder`` at size x size, else n images of the config's train
    split (at their own size, or resized to ``size`` when given)."""
    if folder is not None:
        return folder_images(folder, n, size)
    if size is None:
        return [img.numpy() for img, _ in labelled_batches(data_cfg, data_cfg.train_split, n)]
    x = sample_images(data_cfg, data_cfg.train_split, n, size)
    if x is None:
        raise DatasetError(f"data.dataset={data_cfg.dataset}: the {data_cfg.train_split} split does not load "
                         "for INT8 calibration; pass --calib-data FOLDER")
    return [img[None].numpy() for img in x]
