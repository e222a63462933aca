"""The Figure 4 helper against a brute-force count of valid 3x3 taps, and its command."""
import subprocess
import sys
from pathlib import Path

import pytest

from deeplab.receptive import degenerate_rates, feature_size, valid_weight_fraction


def _brute_force(rate, size):
    counts = []
    for y in range(size):
        for x in range(size):
            counts.append(sum(0 <= y + dy * rate < size and 0 <= x + dx * rate < size
                              for dy in (-1, 0, 1) for dx in (-1, 0, 1)))
    return counts


@pytest.mark.parametrize("rate,size", [(1, 9), (3, 11), (6, 33), (18, 33), (40, 33)])
def test_matches_brute_force(rate, size):
    counts = _brute_force(rate, size)
    assert valid_weight_fraction(rate, size) == pytest.approx(sum(counts) / len(counts) / 9)


def test_figure4_curve_shape_on_65x65():
    # Fig. 4: on a 65x65 map, small rates use all 9 weights almost everywhere; as the rate grows to the map
    # size, the filter degenerates to its centre weight (1 of 9).
    rates = list(range(1, 70))
    fractions = [valid_weight_fraction(r, 65) for r in rates]
    assert fractions[0] > 0.93
    assert all(a >= b for a, b in zip(fractions, fractions[1:]))
    assert valid_weight_fraction(64, 65) > 1 / 9
    assert all(f == pytest.approx(1 / 9) for f in fractions[64:])  # from rate 65 on, only the centre tap


def test_feature_sizes_for_paper_crops():
    assert feature_size(513, 16) == 33 and feature_size(513, 8) == 65 and feature_size(513, 32) == 17
    assert feature_size(321, 16) == 21


def test_degenerate_rates_at_a_threshold():
    assert degenerate_rates((6, 12, 18), 513, 16, threshold=0.25) == []  # the paper's setting works
    bad = degenerate_rates((6, 12, 18), 321, 16, threshold=0.25)  # rate 18 on a 21x21 map
    assert [r for r, _ in bad] == [18]
    assert bad[0][1] == pytest.approx(sum(_brute_force(18, 21)) / 21 ** 2 / 9)
    assert degenerate_rates((6, 12, 18), 321, 16, threshold=0.15) == []  # 18 on 21x21 keeps 0.21 > 0.15
    assert [r for r, _ in degenerate_rates((6, 12, 18), 513, 8, threshold=0.15)] == []  # rates x2 on 65x65
    assert [r for r, _ in degenerate_rates((6, 12, 18, 24), 321, 16, threshold=0.15)] == [24]


def test_command_prints_each_rate_share_at_each_stride():
    """`python -m deeplab.receptive` in a fresh interpreter: the feature map of a 321 crop at OS 16 and 8 and each
    rate (given at 16, doubled at 8) with the brute-force share of valid weights; a bad stride is one line, exit 2."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "deeplab.receptive", "--crop", "321", "--output-stride", "16", "8",
                          "--rates", "6", "24"], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1] == f"output stride 16: feature map {feature_size(321, 16)}x{feature_size(321, 16)}" == \
        "output stride 16: feature map 21x21"
    assert lines[4] == "output stride 8: feature map 41x41"
    for line, rate, size in zip(lines[2:4] + lines[5:7], (6, 24, 12, 48), (21, 21, 41, 41)):
        counts = _brute_force(rate, size)
        assert line == f"  rate {rate:>3}: {sum(counts) / len(counts) / 9:6.1%}"
    bad = subprocess.run([sys.executable, "-m", "deeplab.receptive", "--output-stride", "12"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr == "error: --output-stride 12: must be 4, 8, 16 or 32\n"
