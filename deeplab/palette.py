"""Colours for label maps: the PASCAL VOC palette (also the stable palette for any other class count),
the official Cityscapes colours, and the two pictures predict writes (colorized mask, overlay)."""
from __future__ import annotations

import numpy as np

CITYSCAPES_COLORS = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]


def voc_palette(num_classes: int = 256) -> np.ndarray:
    """The VOC devkit's bit-interleaved palette (num_classes x 3 uint8): class k always gets the same colour,
    whatever the dataset, so it doubles as the stable palette for folder and ADE20K data."""
    ids = np.arange(num_classes)
    palette = np.zeros((num_classes, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            palette[:, channel] |= ((ids >> (3 * shift + channel)) & 1) << (7 - shift)
    return palette.astype(np.uint8)


def palette_bytes(palette: np.ndarray) -> list:
    """A palette as the flat 768-entry list ``PIL.Image.putpalette`` takes (the VOC tail fills unused slots)."""
    full = voc_palette(256)
    full[: len(palette)] = palette[:256]
    return full.reshape(-1).tolist()


def colorize(mask: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 colours; ignore (255) is drawn white, the VOC convention for borders."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = palette[:256]
    lut[ignore_index] = 255
    return lut[mask.astype(np.uint8)]


def boundaries(mask: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another label (HxW bool)."""
    edge = np.zeros(mask.shape, bool)
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:-1] |= mask[:-1] != mask[1:]
    return edge


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5,
            ignore_index: int = 255, background: int | None = 0) -> np.ndarray:
    """Class colours blended over the photo, with each region's outline in its full colour so neighbouring
    classes stay readable; ``background`` (class 0) and ignore pixels show the photo only."""
    colors = colorize(mask, palette, ignore_index)
    keep = mask == ignore_index
    if background is not None:
        keep |= mask == background
    out = image.astype(np.float32) * (1 - alpha) + colors.astype(np.float32) * alpha
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    edge = boundaries(mask) & ~keep
    out[edge] = colors[edge]
    out[keep] = image[keep]
    return out
