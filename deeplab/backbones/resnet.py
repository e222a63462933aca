"""ResNet-50/101/152 (v1.5, torchvision's keys ``conv1``, ``layer4.0.conv2``, ...) with atrous convolution,
Multi-Grid and the paper's cascaded blocks ``layer5..layer7`` (copies of block4)."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .base import Backbone, layouts_densify, stage_layout

# Depth -> units per block (block1..block4) and stem width. "resnet_tiny" is a narrow, shallow bottleneck
# ResNet for tests and CPU demos whose behaviour does not depend on depth.
LAYERS = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
    "resnet_tiny": (1, 1, 1, 1),
}
WIDTH = {"resnet50": 64, "resnet101": 64, "resnet152": 64, "resnet_tiny": 8}


def block_layout(cfg, output_stride: Optional[int] = None) -> list:
    """Per block (block1..block4, then cascaded block5..7): ``(stride, [dilation of each unit's 3x3 conv])``.

    Once the feature map reaches ``output_stride`` a block that would stride keeps stride 1 and the atrous rate
    doubles (Section 3.1). Where the doubled rate starts is ``cfg.atrous_layout``:

    - ``exact``: in block2-3 the unit whose stride is removed keeps the rate of its input and the units after
      it get the doubled rate (the authors' TF-slim ``stack_blocks_dense``); block4 and the cascaded blocks
      follow the paper's Multi-Grid rule, block rate x unit rate (Section 3.2.1: (2, 4, 8) at OS16, (4, 8, 16)
      at OS8 with (1, 2, 4)).
    - ``torchvision``: every block as block2-3 above (its ``_make_layer``; layer4 at OS8 is (2, 4, 4)).
    - ``legacy``: every unit of a block whose stride is removed gets the doubled rate (files written before
      the rule was recorded were trained so).

    Which output-stride switches on the same weights are exact (see `densifies`): with ``exact``, every pair
    of 4, 8 and 16, because only block2-3 lose strides between them; a pair that removes block4's or a
    cascaded block's stride is not, since that unit's Multi-Grid rate (block rate x r1) is twice what
    densifying needs. With ``torchvision`` every pair; with ``legacy`` none.
    """
    units = list(LAYERS[cfg.backbone]) + [LAYERS[cfg.backbone][3]] * cfg.cascade_blocks
    # the stem (7x7 stride-2 conv, stride-2 max pool) leaves stride 4
    return stage_layout(cfg, output_stride or cfg.output_stride, 4, units, grid_from=3)


def densifies(cfg, coarse: int, fine: int) -> bool:
    """Whether the backbone at output stride ``fine`` computes the ``coarse`` features at every position,
    i.e. its output sampled every ``coarse // fine`` pixels equals the ``coarse`` output (same weights, eval
    mode). ASPP's atrous branches then follow (their rates scale by the same factor), image pooling not."""
    return layouts_densify(block_layout(cfg, coarse), block_layout(cfg, fine), coarse // fine)
class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv, as torchvision); its 3x3 conv may be atrous."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def configure(self, stride: int, dilation: int) -> None:
        """Set stride and atrous rate in place: same weights, another output stride."""
        self.conv2.stride = (stride, stride)
        self.conv2.dilation = (dilation, dilation)
        self.conv2.padding = (dilation, dilation)
        if self.downsample is not None:
            self.downsample[0].stride = (stride, stride)

    def forward(self, x):
        stride = self.conv2.stride[0]
        if self.downsample is not None:
            identity = self.downsample(x)
        else:  # a cascaded unit built without stride and switched to one: subsample, as a strided 1x1 would
            identity = x[..., ::stride, ::stride] if stride > 1 else x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetBackbone(Backbone):
    """ResNet without its classifier; ``layer5..layer7`` are the paper's cascaded copies of block4."""

    layout = staticmethod(block_layout)
    torchvision_keys = "ResNet keys (conv1.weight, layer1.0.conv1.weight, ...)"

    def __init__(self, cfg):
        super().__init__()
        width = WIDTH[cfg.backbone]
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layout = block_layout(cfg)
        inplanes = width
        self.block_names = []
        for index, (stride, rates) in enumerate(layout):
            planes = width * 2 ** min(index, 3)
            units = []
            for u, rate in enumerate(rates):
                units.append(Bottleneck(inplanes, planes, stride if u == 0 else 1, rate))
                inplanes = planes * Bottleneck.expansion
            name = f"layer{index + 1}"
            self.add_module(name, nn.Sequential(*units))
            self.block_names.append(name)
        self.out_channels = inplanes

    def configure(self, layout: list) -> None:
        for name, (stride, rates) in zip(self.block_names, layout):
            for u, (unit, rate) in enumerate(zip(getattr(self, name), rates)):
                unit.configure(stride if u == 0 else 1, rate)

    def forward(self, x) -> dict:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.block_names:
            x = getattr(self, name)(x)
        return {"out": x}

    @staticmethod
    def matches_torchvision(keys, name: str) -> bool:
        """ResNet keys whose block3 has as many units as ``name``'s (6, 23, 36)."""
        units = {k.split(".")[1] for k in keys if k.startswith("layer3.")}
        return "conv1.weight" in keys and name in LAYERS and len(units) == LAYERS[name][2]

    def init_weights(self, zero_init_last: bool) -> None:
        """With ``zero_init_last`` each residual unit begins as identity (its last BN scale 0, Goyal et al.
        2017, timm's zero_init_last)."""
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

