"""Figure 4 of the paper: how many of a 3x3 atrous filter's weights land on the feature map, not on padding.

As the rate approaches the feature-map size, only the centre weight stays valid and the filter degenerates
to a 1x1 convolution. The crop-size search uses this to prune configurations before they cost GPU-hours.

    python -m deeplab.receptive --crop 513 --output-stride 16 8 --rates 6 12 18
"""
from __future__ import annotations

import argparse
import sys

from .backbones import backbone_class, backbone_names
from .cli import command
from .config import ConfigError


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


@command
def main(argv=None) -> int:
    """Per output stride, the feature map a crop gives and each ASPP rate's share of valid 3x3 weights."""
    p = argparse.ArgumentParser(prog="python -m deeplab.receptive", description=__doc__.split("\n\n")[0])
    p.add_argument("--crop", type=int, default=513, help="input side in pixels (default: 513)")
    p.add_argument("--output-stride", type=int, nargs="+", default=[16, 8], metavar="OS",
                   help="output strides, powers of two from 4 to 32 (default: 16 8)")
    p.add_argument("--rates", type=int, nargs="+", default=[6, 12, 18], metavar="R",
                   help="ASPP rates at output stride 16, as configs give them; scaled by 16/OS (default: 6 12 18, "
                        "the paper's)")
    p.add_argument("--backbone", default="resnet101", choices=backbone_names(),
                   help="whose strides map the crop to the feature map (default: resnet101)")
    args = p.parse_args(argv)
    if args.crop < 1:
        raise ConfigError(f"--crop {args.crop}: must be >= 1 (the input side in pixels)")
    for os_ in args.output_stride:
        if os_ not in (4, 8, 16, 32):
            raise ConfigError(f"--output-stride {os_}: must be 4, 8, 16 or 32")
    if any(r < 1 for r in args.rates):
        raise ConfigError(f"--rates {' '.join(map(str, args.rates))}: each must be >= 1")
    print(f"{args.backbone}, crop {args.crop}: share of a 3x3 filter's weights on the feature map, not on padding "
          f"(1/9 = {1 / 9:.1%}: a 1x1 filter)")
    for os_ in args.output_stride:
        size = feature_size(args.crop, os_, args.backbone)
        print(f"output stride {os_}: feature map {size}x{size}")
        for r in args.rates:
            rate = r * 16 // os_
            print(f"  rate {rate:>3}: {valid_weight_fraction(rate, size):6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
