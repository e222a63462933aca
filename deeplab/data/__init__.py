"""Datasets (VOC + SBD, Cityscapes, ADE20K, a generic folder, synthetic), the paper's augmentation, and
`python -m deeplab.data check` to validate a dataset before a long run."""
from .datasets import (ADE20K_CLASSES, CITYSCAPES_CLASSES, FORMATS, VOC_CLASSES, DatasetInfo, build_dataset,
                       dataset_info, detect_format, find_pairs, label_map, palette_for_classes)
from .io import DatasetError, read_image, read_mask
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, denormalize, normalize

__all__ = ["ADE20K_CLASSES", "CITYSCAPES_CLASSES", "FORMATS", "VOC_CLASSES", "DatasetInfo", "DatasetError",
           "EvalTransform", "IMAGENET_MEAN", "IMAGENET_STD", "TrainTransform", "build_dataset", "dataset_info",
           "denormalize", "detect_format", "find_pairs", "label_map", "normalize", "palette_for_classes",
           "read_image", "read_mask"]
