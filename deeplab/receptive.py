"""Figure 4 of the paper: how many of a 3x3 atrous filter's weights land on the feature map, not on padding.

As the rate approaches the feature-map size, only the centre weight stays valid and the filter degenerates
to a 1x1 convolution. The crop-size search uses this to prune configurations before they cost GPU-hours.
"""
from __future__ import annotations

import math
import warnings


def feature_size(crop: int, output_stride: int) -> int:
    """Side of the backbone's last feature map for a crop: 513 -> 33 at output stride 16, 65 at 8.

    Every stride-2 layer (stem conv, max pool, first unit of each strided block) maps n to (n - 1) // 2 + 1.
    """
    n = int(crop)
    for _ in range(int(math.log2(output_stride))):
        n = (n - 1) // 2 + 1
    return n


def _valid_taps_1d(rate: int, size: int, kernel: int) -> list:
    """For each position of a 1-D map, how many of the kernel's taps fall inside it (zero padding elsewhere)."""
    half = kernel // 2
    offsets = [rate * (k - half) for k in range(kernel)]
    return [sum(0 <= i + o < size for o in offsets) for i in range(size)]


def valid_weight_histogram(rate: int, feature_size: int, kernel: int = 3) -> dict:
    """Fraction of positions of a square map at which exactly n of the k*k weights are valid (Figure 4's curves)."""
    taps = _valid_taps_1d(rate, feature_size, kernel)
    hist: dict = {}
    for a in taps:
        for b in taps:
            hist[a * b] = hist.get(a * b, 0) + 1
    total = feature_size * feature_size
    return {n: c / total for n, c in sorted(hist.items())}


def valid_weight_fraction(rate: int, feature_size: int, kernel: int = 3) -> float:
    """Mean fraction of the k*k weights applied to valid positions: 1.0 for a small rate, 1/k^2 once degenerate."""
    taps = _valid_taps_1d(rate, feature_size, kernel)
    mean_1d = sum(taps) / len(taps)
    return mean_1d * mean_1d / (kernel * kernel)


DEGENERATE_THRESHOLD = 0.25  # mean valid weights below ~2.25 of 9: the filter is close to 1x1


def degenerate_rates(rates, crop: int, output_stride: int, threshold: float = DEGENERATE_THRESHOLD) -> list:
    """ASPP rates (given at output stride 16) whose 3x3 filter is nearly 1x1 at this crop and output stride.

    Returns (rate_at_os, valid_fraction) pairs; empty when every rate still sees context.
    """
    size = feature_size(crop, output_stride)
    out = []
    for r in rates:
        r_os = r * 16 // output_stride
        frac = valid_weight_fraction(r_os, size)
        if frac < threshold:
            out.append((r_os, frac))
    return out


def warn_degenerate_rates(rates, crop: int, output_stride: int, threshold: float = DEGENERATE_THRESHOLD) -> list:
    """Warn (once per call) about degenerate ASPP rates; returns what degenerate_rates returns."""
    bad = degenerate_rates(rates, crop, output_stride, threshold)
    if bad:
        size = feature_size(crop, output_stride)
        desc = ", ".join(f"rate {r} ({f:.0%} of weights valid)" for r, f in bad)
        warnings.warn(f"ASPP {desc} on a {size}x{size} feature map (crop {crop}, output stride {output_stride}) "
                      f"degenerates towards a 1x1 filter (paper Fig. 4): use a larger crop or smaller rates",
                      stacklevel=2)
    return bad
