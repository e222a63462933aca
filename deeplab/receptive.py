"""Figure 4 of the paper: how many of a 3x3 atrous filter's weights land on the feature map, not on padding.

As the rate approaches the feature-map size, only the centre weight stays valid and the filter degenerates
to a 1x1 convolution. The crop-size search uses this to prune configurations before they cost GPU-hours.
"""
from __future__ import annotations

from .backbones import backbone_class


def feature_size(crop: int, output_stride: int, backbone: str = "resnet101") -> int:
    """Side of the backbone's last feature map for a crop: 513 -> 33 at output stride 16, 65 at 8 (ResNet:
    every stride-2 layer, stem conv, max pool, first unit of each strided block, maps n to (n - 1) // 2 + 1).
    The backbone says it (`deeplab.backbones.base.Backbone.feature_size`)."""
    return backbone_class(backbone).feature_size(crop, output_stride)


def _valid_taps_1d(rate: int, size: int, kernel: int) -> list:
    """For each position of a 1-D map, how many of the kernel's taps fall inside it (zero padding elsewhere)."""
    half = kernel // 2
    offsets = [rate * (k - half) for k in range(kernel)]
    return [sum(0 <= i + o < size for o in offsets) for i in range(size)]


def valid_weight_fraction(rate: int, feature_size: int, kernel: int = 3) -> float:
    """Mean fraction of the k*k weights applied to valid positions: 1.0 for a small rate, 1/k^2 once degenerate."""
    taps = _valid_taps_1d(rate, feature_size, kernel)
    mean_1d = sum(taps) / len(taps)
    return mean_1d * mean_1d / (kernel * kernel)


def degenerate_rates(rates, crop: int, output_stride: int, threshold: float, backbone: str = "resnet101") -> list:
    """ASPP rates (given at output stride 16) whose 3x3 filter keeps less than ``threshold`` of its weights on
    the feature map at this crop and output stride: nearly a 1x1 filter (1/9 is exactly one).

    Returns (rate_at_os, valid_fraction) pairs, in the order given; empty when every rate still sees context.
    """
    size = feature_size(crop, output_stride, backbone)
    out = []
    for r in rates:
        r_os = r * 16 // output_stride
        frac = valid_weight_fraction(r_os, size)
        if frac < threshold:
            out.append((r_os, frac))
    return out
