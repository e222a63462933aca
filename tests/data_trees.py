"""Small dataset trees in the real on-disk layouts (real JPEGs, palette PNGs), for the data tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from deeplab.palette import palette_bytes, voc_palette


def blocks(rng, h, w, labels, block=8):
    """A mask of random labels in block x block squares (clear, known regions)."""
    small = rng.choice(labels, size=(-(-h // block), -(-w // block)))
    return np.kron(small, np.ones((block, block), dtype=small.dtype))[:h, :w].astype(np.uint8)


def photo_for(mask, rng, palette):
    """An image whose colours follow the mask (plus mild noise), so readers can be checked for pairing."""
    img = palette[mask.astype(np.int64) % len(palette)].astype(np.int16) + rng.integers(-6, 7, mask.shape + (3,))
    return np.clip(img, 0, 255).astype(np.uint8)


def save_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def save_png(path: Path, array: np.ndarray, palette=False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        im = Image.fromarray(array.astype(np.uint8), mode="P")
        im.putpalette(palette_bytes(voc_palette(256)))
    else:
        im = Image.fromarray(array)
    im.save(path)


def make_voc(root: Path, train=("2007_000032", "2007_000039"), val=("2007_000033",), aug_only=(),
             size=(40, 56), seed=0, sbd=False, train_aug_list=None) -> dict:
    """VOCdevkit/VOC2012 with palette-PNG SegmentationClass (with a 255 border), optional SBD
    SegmentationClassAug (grayscale) for every id plus ``aug_only`` ids. Returns {id: mask}."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    pal = voc_palette(256)
    masks = {}
    for i in (*train, *val, *aug_only):
        h, w = size
        mask = blocks(rng, h, w, np.arange(21))
        mask[:, :2] = 255  # VOC draws 255 on object borders
        masks[i] = mask
        save_jpeg(voc / "JPEGImages" / f"{i}.jpg", photo_for(mask, rng, pal))
        if i not in aug_only:
            save_png(voc / "SegmentationClass" / f"{i}.png", mask, palette=True)
        if sbd or aug_only:
            save_png(voc / "SegmentationClassAug" / f"{i}.png", mask)
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in val))
    if train_aug_list is not None:
        (lists / "train_aug.txt").write_text("".join(f"{i}\n" for i in train_aug_list))
    return masks


def make_cityscapes(root: Path, split="train", cities=("aachen", "bonn"), size=(32, 64), seed=0) -> dict:
    """leftImg8bit/{split}/{city}/*_leftImg8bit.png and gtFine/.../*_gtFine_labelIds.png (labelIds 0-33)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, city in enumerate(cities):
        stem = f"{city}_{k:06d}_000019"
        label_ids = blocks(rng, *size, np.arange(34))
        image = photo_for(label_ids, rng, voc_palette(256))
        save_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
        save_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label_ids)
        out[stem] = label_ids
    return out


def make_ade20k(root: Path, n=2, size=(36, 48), seed=0) -> dict:
    """ADEChallengeData2016/images/{training,validation}/*.jpg and annotations/*.png (0 = other, 1-150)."""
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    out = {}
    for sub, prefix in (("training", "ADE_train"), ("validation", "ADE_val")):
        for i in range(1, n + 1):
            stem = f"{prefix}_{i:08d}"
            mask = blocks(rng, *size, np.arange(151))
            save_jpeg(base / "images" / sub / f"{stem}.jpg", photo_for(mask, rng, voc_palette(256)))
            save_png(base / "annotations" / sub / f"{stem}.png", mask)
            out[stem] = mask
    return out


def make_folder(root: Path, names=("bg", "cat", "dog"), stems=("a", "b", "c"), size=(30, 30), seed=0,
                splits=None) -> dict:
    """images/*.jpg|png + masks/*.png with classes.txt and optional splits/{split}.txt lists."""
    rng = np.random.default_rng(seed)
    out = {}
    for j, s in enumerate(stems):
        mask = blocks(rng, *size, np.arange(len(names)))
        image = photo_for(mask, rng, voc_palette(256))
        if j % 2:
            save_png(root / "images" / f"{s}.png", image)
        else:
            save_jpeg(root / "images" / f"{s}.jpg", image)
        save_png(root / "masks" / f"{s}.png", mask, palette=bool(j % 2))
        out[s] = mask
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    for split, ids in (splits or {}).items():
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return out
