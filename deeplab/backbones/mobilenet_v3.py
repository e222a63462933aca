"""MobileNetV3-Large (Howard et al., 2019) as torchvision's ``deeplabv3_mobilenet_v3_large`` lays it out: the
feature extractor of inverted residual units (depthwise conv, squeeze-and-excitation, hardswish), its last
stage atrous instead of strided at output stride 16, then a 1x1 conv to 960 channels.

State-dict keys are torchvision's ``features.N...`` without ``features.`` (``0.0.weight``,
``13.block.2.fc1.weight``, ``16.1.running_var``), so a DeepLabV3 file's ``backbone.*`` loads as it is and an
ImageNet file's ``features.*`` after `from_torchvision`. Output stride 8 densifies stage C3 too, on the same
weights (rates from `deeplab.backbones.base.stage_layout`).
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import nn

from .base import Backbone, stage_layout

# The paper's Table 1 (Large): input, kernel, expanded, output channels, squeeze-excite, hardswish, stride.
UNITS = (
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),  # C1
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),  # C2
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2),  # C3
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),  # C4
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
)
STAGES = (1, 2, 3, 6, 3)  # units per stage: the stride-1 unit after the stem, then C1..C4 (each starts strided)
LAST_CHANNELS = 960


def _round8(v: float) -> int:
    """Channels rounded to a multiple of 8, never below 90% of ``v`` (the MobileNet family's rule)."""
    rounded = max(8, int(v + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * v else rounded


def _norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=0.001, momentum=0.01)  # torchvision's MobileNetV3 BatchNorm


class ConvNormAct(nn.Sequential):
    """conv (``0``), BatchNorm (``1``), optional activation (``2``)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: Optional[type] = None):
        layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), _norm(cout)]
        super().__init__(*layers, *([act(inplace=True)] if act else []))


class SqueezeExcite(nn.Module):
    """Channel gates from the global mean: 1x1 conv, ReLU, 1x1 conv, hard sigmoid."""

    def __init__(self, channels: int):
        super().__init__()
        squeezed = _round8(channels // 4)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class InvertedResidual(nn.Module):
    """Expand (1x1, unless already wide), depthwise kxk (strided or atrous), excite, project (1x1, linear)."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool, hardswish: bool, stride: int):
        super().__init__()
        act = nn.Hardswish if hardswish else nn.ReLU
        layers = [ConvNormAct(cin, expanded, 1, act=act)] if expanded != cin else []
        self.depthwise_index = len(layers)  # an index, not an attribute: the conv's keys stay torchvision's
        layers.append(ConvNormAct(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcite(expanded))
        layers.append(ConvNormAct(expanded, cout, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def configure(self, stride: int, dilation: int) -> None:
        conv = self.block[self.depthwise_index][0]
        conv.stride = (stride, stride)
        conv.dilation = (dilation, dilation)
        pad = (conv.kernel_size[0] - 1) // 2 * dilation
        conv.padding = (pad, pad)

    def forward(self, x):
        out = self.block(x)
        return out + x if self.residual else out


class MobileNetV3Large(Backbone):
    """Children ``0`` (stem, stride 2), ``1..15`` (inverted residual units), ``16`` (1x1 conv to 960)."""

    out_channels = LAST_CHANNELS
    torchvision_keys = "MobileNetV3 keys (features.0.0.weight, features.1.block.0.0.weight, ...)"

    @classmethod
    def layout(cls, cfg, output_stride: Optional[int] = None) -> list:
        """Stages as ResNet's blocks (`stage_layout`); the last stage follows Multi-Grid under every layout,
        so torchvision's file (Multi-Grid (1, 1, 1)) has rates (2, 2, 2) there at OS16, as its ``dilated``
        model, and (4, 4, 4) at OS8, where C3 becomes (1, 2, 2, 2, 2, 2)."""
        return stage_layout(cfg, output_stride or cfg.output_stride, 2, STAGES, grid_from=len(STAGES) - 1,
                            grid_in_torchvision=True)

    @classmethod
    def densifies(cls, cfg, coarse: int, fine: int) -> bool:
        """Never exactly: the rates densify (`layouts_densify`), but squeeze-and-excitation averages over the
        whole, denser map, so the gates differ slightly from the coarse map's."""
        return False

    def __init__(self, cfg):
        super().__init__()
        self.add_module("0", ConvNormAct(3, UNITS[0][0], 3, 2, act=nn.Hardswish))
        for index, unit in enumerate(UNITS, start=1):
            self.add_module(str(index), InvertedResidual(*unit))
        self.add_module(str(len(UNITS) + 1), ConvNormAct(UNITS[-1][3], LAST_CHANNELS, 1, act=nn.Hardswish))
        self.set_output_stride(cfg)

    def _units(self) -> list:
        return [getattr(self, str(i)) for i in range(1, len(UNITS) + 1)]

    def configure(self, layout: list) -> None:
        units = iter(self._units())
        for stride, rates in layout:
            for u, rate in enumerate(rates):
                next(units).configure(stride if u == 0 else 1, rate)

    def forward(self, x) -> dict:
        for module in self.children():
            x = module(x)
        return {"out": x}

    @staticmethod
    def from_torchvision(state: dict) -> dict:
        return {k[len("features."):] if k.startswith("features.") else k: v for k, v in state.items()}

    @staticmethod
    def matches_torchvision(keys, name: str) -> bool:
        return {"0.0.weight", "15.block.3.0.weight", "16.0.weight"} <= set(keys)
