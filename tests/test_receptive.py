"""The Figure 4 helper against a brute-force count of valid 3x3 taps."""
import warnings

import pytest

from deeplab.receptive import (degenerate_rates, feature_size, valid_weight_fraction, valid_weight_histogram,
                               warn_degenerate_rates)


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
    hist = valid_weight_histogram(rate, size)
    for n, share in hist.items():
        assert share == pytest.approx(counts.count(n) / len(counts))


def test_figure4_curve_shape_on_65x65():
    # Fig. 4: on a 65x65 map, small rates use all 9 weights almost everywhere; as the rate grows to the map
    # size, the filter degenerates to its centre weight (1 of 9).
    rates = list(range(1, 70))
    fractions = [valid_weight_fraction(r, 65) for r in rates]
    assert fractions[0] > 0.93
    assert all(a >= b for a, b in zip(fractions, fractions[1:]))
    assert valid_weight_fraction(65, 65) == pytest.approx(1 / 9)
    nine = [valid_weight_histogram(r, 65).get(9, 0.0) for r in rates]
    one = [valid_weight_histogram(r, 65).get(1, 0.0) for r in rates]
    assert nine[0] > 0.9 and nine[-1] == 0.0
    assert one[0] == 0.0 and one[-1] == 1.0
    assert one.index(1.0) == 64  # from rate 65 on, only the centre weight lands on the map


def test_feature_sizes_for_paper_crops():
    assert feature_size(513, 16) == 33 and feature_size(513, 8) == 65 and feature_size(513, 32) == 17
    assert feature_size(321, 16) == 21


def test_degenerate_rates_warn_for_small_crops():
    assert degenerate_rates((6, 12, 18), 513, 16) == []  # the paper's setting works
    bad = degenerate_rates((6, 12, 18), 321, 16)  # rate 18 on a 21x21 map
    assert [r for r, _ in bad] == [18]
    with pytest.warns(UserWarning, match="degenerates towards a 1x1"):
        warn_degenerate_rates((6, 12, 18), 129, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_degenerate_rates((6, 12, 18), 513, 16)
