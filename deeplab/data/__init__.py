"""Datasets (VOC + SBD, Cityscapes, ADE20K, a generic folder, synthetic), the paper's augmentation, and
`python -m deeplab.data check` to validate a dataset before a long run.

Reading files (`io`: read_image, read_mask, DatasetError) needs only Pillow and numpy and is loaded at once;
the rest (torch) on first use, so a process that only decodes images (cluster.segment's Ray Data read
tasks) never loads torch and its thread runtimes."""
import importlib

from .io import DatasetError, read_image, read_mask  # noqa: F401  (the package's eager names)

_LAZY = {name: ".datasets" for name in ("FORMATS", "DatasetInfo", "build_dataset", "dataset_for_model", "dataset_info",
                                        "detect_format", "find_pairs", "label_map")}
_LAZY.update({name: ".classes" for name in ("ADE20K_CLASSES", "CITYSCAPES_CLASSES", "VOC_CLASSES",
                                            "palette_for_classes")})
_LAZY.update({name: ".transforms" for name in ("EvalTransform", "TrainTransform", "denormalize", "normalize")})
_LAZY.update({name: ".imagenet" for name in ("IMAGENET_MEAN", "IMAGENET_STD", "normalize_array")})

__all__ = sorted(["DatasetError", "read_image", "read_mask", *_LAZY])


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'deeplab.data' has no attribute {name!r}")
