"""ImageNet normalization in numpy alone: what every model here expects at its input. Kept apart from the
transforms (which use torch) so an exported model's runner (segment's actors, serve's replicas) never loads torch."""
from __future__ import annotations

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# uint8 -> normalized float per channel: one table lookup instead of convert, subtract, multiply.
_LUT = ((np.arange(256)[None] - np.array(IMAGENET_MEAN)[:, None] * 255)
        / (np.array(IMAGENET_STD)[:, None] * 255)).astype(np.float32)


def normalize_into(out: np.ndarray, image: np.ndarray) -> None:
    """HxWx3 uint8 ``image`` -> ``out`` (3xHxW float32), ImageNet-normalized."""
    for c in range(3):
        np.take(_LUT[c], image[..., c], out=out[c])


def normalize_array(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32 with ImageNet mean/std, as a numpy array."""
    out = np.empty((3,) + image.shape[:2], np.float32)
    normalize_into(out, image)
    return out
