"""Backbones by name: one file each behind the contract of `deeplab.backbones.base.Backbone`.

Config validation, the model builder, the torchvision importer, export, tuning and gpu_check read this
registry, so a new backbone is one file plus one `register_backbone` call (a test may register one from its
own file). This module imports no torch: the config checks a name here, and a backbone's code is imported
when a model is first built.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Tuple, Union


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the project knows about a backbone without building it.

    builder: the `Backbone` subclass, or ``"module:Class"`` imported on first use.
    output_strides: the strides it reaches with atrous convolution on the same weights (no cascaded blocks).
    cascade: whether ``model.cascade_blocks`` can append copies of its last stage (the paper's block5-7).
    torchvision: torchvision architecture names this backbone imports (``python -m deeplab.import_torchvision
    --arch``) -> the ModelConfig fields that reproduce that model; ``None`` for an ImageNet classifier file,
    whose backbone weights load under the project's own head.
    for_tests: a small model for tests and CPU dry runs, not offered where real models are measured.
    """

    builder: Union[str, Callable]
    output_strides: Tuple[int, ...] = (4, 8, 16, 32)
    cascade: bool = False
    torchvision: Mapping[str, Mapping] = field(default_factory=dict)
    for_tests: bool = False

    def load(self):
        """The `Backbone` class (importing its module the first time)."""
        if isinstance(self.builder, str):
            module, _, name = self.builder.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.builder


_REGISTRY: Dict[str, BackboneSpec] = {}


def register_backbone(name: str, spec: BackboneSpec) -> None:
    """Make ``model.backbone: NAME`` build ``spec``; a name is registered once."""
    if name in _REGISTRY and _REGISTRY[name] != spec:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[name] = spec


def backbone_names(real_only: bool = False) -> Tuple[str, ...]:
    """Registered names, in registration order; ``real_only``: without the models made for tests."""
    return tuple(n for n, spec in _REGISTRY.items() if not (real_only and spec.for_tests))


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backbone {name!r} is unknown; allowed: {', '.join(_REGISTRY)}") from None


def backbone_class(name: str):
    return backbone_spec(name).load()


def torchvision_archs() -> Dict[str, Tuple[str, Mapping]]:
    """Every importable torchvision architecture -> (backbone name, ModelConfig fields or None)."""
    return {arch: (name, fields) for name, spec in _REGISTRY.items() for arch, fields in spec.torchvision.items()}


# torchvision's DeepLabV3 files: its head and atrous layout, no Multi-Grid (rates are given at OS16).
_TV_RESNET = {"output_stride": 8, "multi_grid": (1, 1, 1), "aspp_rates": (6, 12, 18), "image_pooling": True,
              "head": "torchvision", "atrous_layout": "torchvision"}
_TV_MOBILENET = {**_TV_RESNET, "output_stride": 16, "aspp_rates": (12, 24, 36)}

for _depth in ("resnet50", "resnet101", "resnet152"):
    _archs = {_depth: None, **({f"deeplabv3_{_depth}": _TV_RESNET} if _depth != "resnet152" else {})}
    register_backbone(_depth, BackboneSpec("deeplab.backbones.resnet:ResNetBackbone", cascade=True,
                                           torchvision=_archs))
register_backbone("resnet_tiny", BackboneSpec("deeplab.backbones.resnet:ResNetBackbone", cascade=True, for_tests=True))
register_backbone("mobilenet_v3_large", BackboneSpec(
    "deeplab.backbones.mobilenet_v3:MobileNetV3Large",
    torchvision={"mobilenet_v3_large": None, "deeplabv3_mobilenet_v3_large": _TV_MOBILENET}))
