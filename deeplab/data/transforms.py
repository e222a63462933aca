"""The paper's augmentation on (image, mask) pairs (Section 4.1): random scale 0.5-2.0, pad to the crop with
the mean pixel (0 after normalization) and 255 in the mask, random crop, random left-right flip.

A transform takes ``(image HxWx3 uint8, mask HxW uint8, rng: numpy Generator)`` and returns
``(image 3xHxW float32 ImageNet-normalized, mask HxW int64)``. All randomness comes from ``rng``, which the
dataset derives from (seed, epoch, index): the same sample gets the same crop whatever the worker or rank.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .imagenet import IMAGENET_MEAN, IMAGENET_STD, normalize_array
from .imagenet import normalize_into as _normalize_into

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
_INV_STD = 1 / (torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255)


def normalize(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 with ImageNet mean/std (what ImageNet-pretrained ResNets expect)."""
    return torch.from_numpy(normalize_array(image))


def denormalize(image: torch.Tensor) -> np.ndarray:
    """3xHxW normalized -> HxWx3 uint8 (for pictures and tests)."""
    t = image.detach().cpu().float() / _INV_STD + _MEAN
    return t.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _place(image: np.ndarray, mask: np.ndarray, height: int, width: int, ignore_index: int):
    """Normalize and put the pair at the top-left of a height x width canvas: image 0 (the mean pixel after
    normalization), mask ``ignore_index``, so padding never counts as background."""
    h, w = mask.shape
    out = np.zeros((3, height, width), np.float32)
    if (h, w) == (height, width):
        _normalize_into(out, image)
    else:
        out[:, :h, :w] = normalize(image).numpy()
    target = torch.full((height, width), ignore_index, dtype=torch.int64)
    target[:h, :w] = torch.from_numpy(np.require(mask, np.uint8, ["C", "W"]))
    return torch.from_numpy(out), target


class TrainTransform:
    """Random scale, pad, random crop ``crop_size`` x ``crop_size``, random flip, normalize. The settings are
    DataConfig's, checked there."""

    def __init__(self, crop_size: int = 513, scale_min: float = 0.5, scale_max: float = 2.0, flip: bool = True,
                 ignore_index: int = 255):
        self.crop_size, self.scale_min, self.scale_max = crop_size, scale_min, scale_max
        self.flip, self.ignore_index = flip, ignore_index

    def sample(self, height: int, width: int, rng: np.random.Generator) -> dict:
        """The random choices for one sample, drawn in a fixed order (so they are reproducible)."""
        scale = float(rng.uniform(self.scale_min, self.scale_max))
        h, w = max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
        top = int(rng.integers(0, max(h - self.crop_size, 0) + 1))
        left = int(rng.integers(0, max(w - self.crop_size, 0) + 1))
        flip = bool(rng.random() < 0.5) and self.flip
        return {"height": h, "width": w, "top": top, "left": left, "flip": flip}

    def apply(self, image: np.ndarray, mask: np.ndarray, p: dict):
        """Scale, crop and flip with the choices ``p``. Only the crop is resampled (Pillow's ``box``): the
        same pixel mapping as resizing the whole image and cropping it, at a fraction of the cost."""
        h0, w0 = mask.shape
        c = self.crop_size
        sy, sx = p["height"] / h0, p["width"] / w0
        ch, cw = min(c, p["height"] - p["top"]), min(c, p["width"] - p["left"])
        box = (p["left"] / sx, p["top"] / sy, (p["left"] + cw) / sx, (p["top"] + ch) / sy)
        if (sy, sx) == (1.0, 1.0):
            image = image[p["top"]:p["top"] + ch, p["left"]:p["left"] + cw]
            mask = mask[p["top"]:p["top"] + ch, p["left"]:p["left"] + cw]
        else:
            image = np.asarray(Image.fromarray(image).resize((cw, ch), Image.BILINEAR, box=box))
            mask = np.asarray(Image.fromarray(mask).resize((cw, ch), Image.NEAREST, box=box))
        if p["flip"]:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return _place(image, mask, c, c, self.ignore_index)

    def __call__(self, image, mask, rng):
        return self.apply(image, mask, self.sample(*mask.shape, rng))


class EvalTransform:
    """The whole image at full resolution; with ``size`` set, padded to it (image 0, mask 255) so a batch
    collates. An image larger than ``size`` is refused rather than cropped: cropping would drop labels."""

    def __init__(self, size=None, ignore_index: int = 255):
        if isinstance(size, int):
            size = (size, size)
        self.size = tuple(size) if size else None
        self.ignore_index = ignore_index

    def __call__(self, image, mask, rng=None):
        if self.size is None:
            return _place(image, mask, *mask.shape, self.ignore_index)
        h, w = mask.shape
        if h > self.size[0] or w > self.size[1]:
            raise ValueError(f"{w}x{h} image is larger than data.val_size {self.size[1]}x{self.size[0]}")
        return _place(image, mask, *self.size, self.ignore_index)
