"""Dataset readers for the layouts users already have, plus the synthetic default.

Contract: ``build_dataset(cfg, split, train)[i]`` is ``(image 3xHxW float32 ImageNet-normalized,
mask HxW int64 with 255 ignore)``; with ``train=True`` every sample is crop_size x crop_size. Augmentation
randomness is a pure function of (cfg.seed, epoch, index): call ``dataset.set_epoch(epoch)`` each epoch
(the epoch lives in shared memory, so persistent DataLoader workers see it too).
Layouts (``--format``):
  voc         VOCdevkit/VOC2012: JPEGImages/, SegmentationClass/ (palette PNGs), ImageSets/Segmentation/*.txt;
              split ``train_aug``: SegmentationClassAug/ with train_aug.txt (derived when absent: every SBD
              mask plus VOC train, minus VOC val: 10,582 images)
  cityscapes  leftImg8bit/{split}/{city}/*_leftImg8bit.png, gtFine/{split}/{city}/*_gtFine_labelIds.png
  ade20k      ADEChallengeData2016/images/{training,validation}/*.jpg, annotations/.../*.png (0 -> ignore)
  folder      images/ and masks/ with matching names (optionally images/{split}/, or splits/{split}.txt),
              classes.txt with one class name per line (or data.num_classes)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import ConfigError
from ..palette import CITYSCAPES_COLORS, voc_palette
from . import synthetic
from .classes import ADE20K_CLASSES, CITYSCAPES_CLASSES, VOC_CLASSES
from .formats import DATASETS
from .io import DatasetError, LabelMap, load_pair, read_mask
from .transforms import EvalTransform, TrainTransform

FORMATS = DATASETS  # the layouts --format names
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Official cityscapesScripts labels.py: labelId -> trainId (19 classes; everything else ignored).
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    class_names: list
    palette: np.ndarray  # num_classes x 3 uint8
    ignore_index: int = 255


# ---------------------------------------------------------------------------------------------------------
# Layouts: each returns (pairs [(image_path, mask_path)], problems [one line each]).


def _read_list(path: Path) -> list:
    """Ids from a split list; DeepLab-style lines "/JPEGImages/x.jpg /SegmentationClassAug/x.png" work too."""
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            ids.append(Path(line.split()[0]).stem)
    return ids


def _voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DatasetError(f"{root}: no JPEGImages/ folder; expected a VOCdevkit/VOC2012 layout")


def voc_pairs(root: Path, split: str):
    root = _voc_root(root)
    lists = root / "ImageSets" / "Segmentation"
    problems = []
    if split in ("train_aug", "trainaug"):
        masks = root / "SegmentationClassAug"
        if not masks.is_dir():
            raise DatasetError(f"{masks}: not found; split train_aug needs the SBD masks (SegmentationClassAug/)")
        val_file = lists / "val.txt"
        val = set(_read_list(val_file)) if val_file.is_file() else set()
        list_file = next((p for p in (lists / "train_aug.txt", lists / "trainaug.txt") if p.is_file()), None)
        if list_file is not None:
            ids = _read_list(list_file)
            overlap = sorted(set(ids) & val)
            if overlap:
                raise DatasetError(f"{list_file}: {len(overlap)} ids are also in {val_file.name} (e.g. {overlap[0]}); "
                                   "SBD's own train split overlaps VOC val, use the train_aug list that excludes val")
        else:  # the standard recipe: SBD train+val and VOC train, minus VOC val
            train_file = lists / "train.txt"
            voc_train = set(_read_list(train_file)) if train_file.is_file() else set()
            ids = sorted(({p.stem for p in masks.glob("*.png")} | voc_train) - val)
    else:
        list_file = lists / f"{split}.txt"
        if not list_file.is_file():
            have = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
            raise DatasetError(f"{list_file}: split list not found (have: {', '.join(have) or 'none'})")
        ids = _read_list(list_file)
        masks = root / "SegmentationClass"
    pairs = []
    for i in ids:
        image, mask = root / "JPEGImages" / f"{i}.jpg", masks / f"{i}.png"
        if not image.is_file():
            problems.append(f"{image}: missing image for mask {mask.name}")
        elif not mask.is_file():
            problems.append(f"{mask}: missing mask for image {image.name}")
        else:
            pairs.append((image, mask))
    return pairs, problems


def cityscapes_pairs(root: Path, split: str):
    images_dir = root / "leftImg8bit" / split
    if not images_dir.is_dir():
        have = sorted(p.name for p in images_dir.parent.iterdir() if p.is_dir()) if images_dir.parent.is_dir() else []
        raise DatasetError(f"{images_dir}: not found; expected leftImg8bit/{split}/CITY/*_leftImg8bit.png"
                           + (f" (splits here: {', '.join(have)})" if have else ""))
    pairs, problems = [], []
    for image in sorted(images_dir.glob("*/*_leftImg8bit.png")):
        stem = image.name[: -len("_leftImg8bit.png")]
        mask = root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelIds.png"
        if mask.is_file():
            pairs.append((image, mask))
        else:
            problems.append(f"{mask}: missing mask for image {image.name}")
    return pairs, problems


def _ade_root(root: Path) -> Path:
    for cand in (root, root / "ADEChallengeData2016"):
        if (cand / "images").is_dir() and (cand / "annotations").is_dir():
            return cand
    raise DatasetError(f"{root}: no images/ and annotations/ folders; expected ADEChallengeData2016")


def ade20k_pairs(root: Path, split: str):
    root = _ade_root(root)
    sub = {"train": "training", "val": "validation"}.get(split, split)
    images_dir = root / "images" / sub
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: not found (splits are training and validation)")
    pairs, problems = [], []
    for image in sorted(images_dir.glob("*.jpg")):
        mask = root / "annotations" / sub / f"{image.stem}.png"
        if mask.is_file():
            pairs.append((image, mask))
        else:
            problems.append(f"{mask}: missing mask for image {image.name}")
    return pairs, problems


FLAT_SPLITS = ("train", "val", "test", "all")  # names that mean "every pair" in a folder without splits


def _require_folder_split(root: Path, split: str) -> None:
    """A split name that is neither a folder nor a list is a typo unless the dataset has no splits at all."""
    folders = {p.name for p in (root / "images").iterdir() if p.is_dir()}
    lists = {p.stem for p in [*(root / "splits").glob("*.txt"), *root.glob("*.txt")] if p.name != "classes.txt"}
    have = sorted(folders | lists)
    if have:
        raise DatasetError(f"{root}: split {split!r} does not exist; splits here: {', '.join(have)}")
    if split not in FLAT_SPLITS:
        raise DatasetError(f"{root}: split {split!r} does not exist; this folder has no split folders or lists, "
                           f"so {', '.join(FLAT_SPLITS)} all mean every image")


def folder_pairs(root: Path, split: str):
    """images/ + masks/ with matching stems; a split is images/{split}/ or a list splits/{split}.txt
    (or {split}.txt); with neither, every split is all pairs."""
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise DatasetError(f"{root}: expected images/ and masks/ folders with matching file names")
    images_dir, masks_dir = root / "images", root / "masks"
    ids = None
    if (images_dir / split).is_dir():
        images_dir, masks_dir = images_dir / split, masks_dir / split
    else:
        list_file = next((p for p in (root / "splits" / f"{split}.txt", root / f"{split}.txt") if p.is_file()), None)
        if list_file is not None:
            ids = _read_list(list_file)
        else:
            _require_folder_split(root, split)
    images = {p.stem: p for p in sorted(images_dir.glob("*")) if p.suffix.lower() in IMAGE_SUFFIXES}
    masks = {p.stem: p for p in sorted(masks_dir.glob("*.png"))} if masks_dir.is_dir() else {}
    pairs, problems = [], []
    for i in (ids if ids is not None else sorted(images)):
        if i not in images:
            problems.append(f"{images_dir / i}.*: missing image for {split} list entry {i}")
        elif i not in masks:
            problems.append(f"{masks_dir / i}.png: missing mask for image {images[i].name}")
        else:
            pairs.append((images[i], masks[i]))
    if ids is None:
        problems += [f"{m}: mask without an image" for i, m in masks.items() if i not in images]
    return pairs, problems


PAIR_FINDERS = {"voc": voc_pairs, "cityscapes": cityscapes_pairs, "ade20k": ade20k_pairs, "folder": folder_pairs}


def detect_format(root) -> str:
    """Guess the layout of a dataset root (for ``--data DIR`` without ``--format``)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    checks = [("voc", lambda: _voc_root(root)), ("ade20k", lambda: _ade_root(root))]
    for name, fn in checks:
        try:
            fn()
            return name
        except DatasetError:
            pass
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "folder"
    raise DatasetError(f"{root}: cannot tell the dataset layout; pass --format voc|cityscapes|ade20k|folder")


# ---------------------------------------------------------------------------------------------------------
# Class information and label maps


def _folder_classes(cfg) -> list:
    names_file = Path(cfg.root) / "classes.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if not names:
            raise DatasetError(f"{names_file}: no class names")
        if cfg.num_classes and cfg.num_classes != len(names):
            raise DatasetError(f"{names_file}: {len(names)} class names but data.num_classes={cfg.num_classes}")
        return names
    if cfg.num_classes:
        return [f"class_{i}" for i in range(cfg.num_classes)]
    raise DatasetError(f"{names_file}: not found; a folder dataset needs classes.txt (one name per line) "
                       "or data.num_classes")


def dataset_info(cfg) -> DatasetInfo:
    """Number of classes, their names and colours for a DataConfig (cheap: reads no images)."""
    fmt = cfg.dataset
    if fmt == "synthetic":
        names = synthetic.class_names(cfg.synthetic_classes)
        return DatasetInfo("synthetic", len(names), names, voc_palette(len(names)), cfg.ignore_index)
    if fmt == "voc":
        return DatasetInfo("voc", 21, list(VOC_CLASSES), voc_palette(21), cfg.ignore_index)
    if fmt == "cityscapes":
        return DatasetInfo("cityscapes", 19, list(CITYSCAPES_CLASSES), np.array(CITYSCAPES_COLORS, np.uint8),
                           cfg.ignore_index)
    if fmt == "ade20k":
        return DatasetInfo("ade20k", 150, list(ADE20K_CLASSES), voc_palette(151)[1:], cfg.ignore_index)
    if fmt == "folder":
        _require_root(cfg)
        names = _folder_classes(cfg)
        return DatasetInfo("folder", len(names), names, voc_palette(len(names)), cfg.ignore_index)
    raise DatasetError(f"data.dataset={fmt!r} is unknown; allowed: {', '.join(FORMATS)}")


def dataset_for_model(cfg, num_classes: int, where: str, hint: str = "") -> DatasetInfo:
    """The dataset's info, refused in one line (``where``: the model's field or file; ``hint``: what to do) when
    its classes are not the model's: the one check every command that trains or evaluates makes."""
    info = dataset_info(cfg)
    if info.num_classes != num_classes:
        raise ConfigError(f"{where}: the model predicts {num_classes} classes but the {cfg.dataset} dataset has "
                          f"{info.num_classes}{hint}")
    return info


def label_map(cfg, info: DatasetInfo) -> LabelMap:
    """Stored mask values -> training ids, with the values each format allows."""
    ignore = cfg.ignore_index
    if cfg.dataset == "cityscapes":
        lut = np.full(256, ignore, np.uint8)
        for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
            lut[label_id] = train_id
        valid = np.zeros(256, bool)
        valid[:34] = True
        return LabelMap(lut, valid, "Cityscapes labelIds 0-33")
    if cfg.dataset == "ade20k":  # 0 is "other" -> ignore; 1..150 -> 0..149
        lut = np.full(256, ignore, np.uint8)
        lut[1:151] = np.arange(150)
        valid = np.zeros(256, bool)
        valid[:151] = True
        return LabelMap(lut, valid, "ADE20K ids 0-150")
    return LabelMap.identity(info.num_classes, ignore)


def _require_root(cfg) -> Path:
    if not cfg.root:
        raise DatasetError(f"data.root is not set for data.dataset={cfg.dataset}; point it at the dataset folder")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found (data.root)")
    return root


def find_pairs(cfg, split: str):
    """(pairs, problems) for a file dataset; problems are one line each, naming the file."""
    return PAIR_FINDERS[cfg.dataset](_require_root(cfg), split)


# ---------------------------------------------------------------------------------------------------------
# Datasets


class _Segmentation(Dataset):
    """Shared machinery: index -> (image, mask) from ``load``, then the transform with a per-sample rng."""

    def __init__(self, transform, seed: int, info: DatasetInfo):
        self.transform = transform
        self.seed = int(seed)
        self.info = info
        self.indices = None  # bootstrapping: positions -> underlying indices (repeats allowed)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """New augmentations each epoch; shared memory, so persistent DataLoader workers follow."""
        self._epoch[0] = int(epoch)

    def rng(self, position: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(self._epoch[0]), int(position)])

    def num_items(self) -> int:
        raise NotImplementedError

    def load(self, index: int):
        raise NotImplementedError

    def name(self, index: int) -> str:
        raise NotImplementedError

    def load_mask(self, index: int) -> np.ndarray:
        return self.load(index)[1]

    def __len__(self):
        return len(self.indices) if self.indices is not None else self.num_items()

    def __getitem__(self, position: int):
        if not -len(self) <= position < len(self):
            raise IndexError(f"sample {position} of a dataset of {len(self)}")
        position %= len(self)
        index = self.indices[position] if self.indices is not None else position
        image, mask = self.load(index)
        try:
            return self.transform(image, mask, self.rng(position))
        except ValueError as e:  # e.g. larger than data.val_size: name the file
            raise DatasetError(f"{self.name(index)}: {e}") from None

    def bootstrap(self, classes, repeat: int) -> int:
        """The paper's bootstrapping (Section 4.3): images containing a hard class appear ``repeat`` times.
        Reads every mask once. Returns how many images were repeated."""
        classes = np.asarray(sorted({int(c) for c in classes}))
        if not len(classes) or repeat <= 1:
            return 0
        positions, hard = [], 0
        for i in range(self.num_items()):
            present = np.bincount(self.load_mask(i).ravel(), minlength=256)[classes].any()
            hard += int(present)
            positions += [i] * (repeat if present else 1)
        self.indices = positions
        return hard


class FileSegmentation(_Segmentation):
    def __init__(self, pairs, labels: LabelMap, transform, seed: int, info: DatasetInfo):
        super().__init__(transform, seed, info)
        self.pairs = [(str(a), str(b)) for a, b in pairs]  # plain strings pickle small to workers
        self.labels = labels

    def num_items(self):
        return len(self.pairs)

    def name(self, index):
        return self.pairs[index][0]

    def load(self, index):
        image, mask = self.pairs[index]
        return load_pair(image, mask, self.labels)

    def load_mask(self, index):
        path = self.pairs[index][1]
        return self.labels.apply(read_mask(path), path)


class SyntheticSegmentation(_Segmentation):
    """Scenes generated on the fly (see deeplab/data/synthetic.py); no files."""

    def __init__(self, size: int, count: int, num_classes: int, split: str, transform, seed: int, info):
        super().__init__(transform, seed, info)
        self.size, self.count, self.num_classes, self.split = size, count, num_classes, split

    def num_items(self):
        return self.count

    def name(self, index):
        return f"synthetic:{self.split}:{index}"

    def load(self, index):
        return synthetic.render(self.seed, index, self.size, self.num_classes, self.split)


def build_dataset(cfg, split: Optional[str] = None, train: bool = False) -> _Segmentation:
    """The dataset for a DataConfig split; ``train`` selects the paper's augmentation (else whole images,
    padded to ``cfg.val_size`` when set). Layout problems raise DatasetError naming the first file."""
    split = split or (cfg.train_split if train else cfg.val_split)
    info = dataset_info(cfg)
    if train:
        transform = TrainTransform(cfg.crop_size, cfg.scale_min, cfg.scale_max, cfg.flip, cfg.ignore_index)
    else:
        transform = EvalTransform(cfg.val_size, cfg.ignore_index)
    if cfg.dataset == "synthetic":
        count = {"train": cfg.synthetic_train, "val": cfg.synthetic_val}.get(split)
        if count is None:
            raise DatasetError(f"synthetic data has splits train and val, not {split!r}")
        ds = SyntheticSegmentation(cfg.synthetic_size, count, cfg.synthetic_classes, split, transform, cfg.seed, info)
    else:
        pairs, problems = find_pairs(cfg, split)
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise DatasetError(f"{problems[0]}{more}; run: python -m deeplab.data check --format {cfg.dataset} "
                               f"--root {cfg.root} --split {split}")
        if not pairs:
            raise DatasetError(f"{cfg.root}: split {split!r} of the {cfg.dataset} dataset is empty")
        ds = FileSegmentation(pairs, label_map(cfg, info), transform, cfg.seed, info)
    if train and cfg.bootstrap_classes and cfg.bootstrap_repeat > 1:
        bad = [c for c in cfg.bootstrap_classes if not 0 <= int(c) < info.num_classes]
        if bad:
            raise DatasetError(f"data.bootstrap_classes={list(cfg.bootstrap_classes)}: {bad[0]} is not a class id "
                               f"0-{info.num_classes - 1}")
        hard = ds.bootstrap(cfg.bootstrap_classes, cfg.bootstrap_repeat)
        print(f"bootstrapping: {hard} of {ds.num_items()} images hold a hard class, repeated "
              f"{cfg.bootstrap_repeat}x -> {len(ds)} samples", file=sys.stderr)
    return ds
