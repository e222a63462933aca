"""Search spaces and pruning, checked against the paper's tables and a brute-force count of valid taps."""
import itertools

import pytest

import cluster  # noqa: F401  (registers the cluster section, as tuning.search_rates does before it prunes)
from deeplab.config import ConfigError, ExperimentConfig, ModelConfig
from tuning import spaces


def _brute_valid_fraction(rate, size):
    """Mean share of a 3x3 atrous filter's taps that land inside a size x size map (zero padding elsewhere)."""
    total = 0
    for y, x in itertools.product(range(size), repeat=2):
        total += sum(0 <= y + dy * rate < size and 0 <= x + dx * rate < size for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    return total / (size * size * 9)


def _brute_feature_size(crop, output_stride):
    """Run the crop through real stride-2 convolutions' size formula: k=3, pad=1, stride 2 -> floor((n-1)/2)+1."""
    n = crop
    stride = 1
    while stride < output_stride:
        n = (n + 2 * 1 - 3) // 2 + 1
        stride *= 2
    return n


def test_paper_preset_is_exactly_the_papers_grid():
    # Table 3's Multi-Grid rows, Table 5's ASPP columns and image pooling, the appendix's crop sizes; OS 16.
    points = spaces.expand(spaces.load_space("paper"))
    seen = {(p["multi_grid"], p["aspp_rates"], p["image_pooling"], p["crop_size"], p["output_stride"]) for p in points}
    expected = set(itertools.product([(1, 1, 1), (1, 2, 1), (1, 2, 3), (1, 2, 4), (2, 2, 2)],
                                     [(6, 12, 18), (6, 12, 18, 24)], [True, False], [321, 513], [16]))
    assert len(points) == 40 and seen == expected
    # the paper's best model (Table 5, 77.21) is one of the points
    assert {"multi_grid": (1, 2, 4), "aspp_rates": (6, 12, 18), "image_pooling": True, "crop_size": 513,
            "output_stride": 16} in points


def test_paper_grid_pruning_keeps_513_and_drops_rate_24_at_321():
    base = ExperimentConfig()
    kept, pruned = spaces.prune(spaces.expand(spaces.load_space("paper")), base, min_valid_weight=0.15, workers=8)
    # crop 321 -> 21x21 features at OS16: rate 24 >= 21 leaves only the centre tap (1/9), a 1x1 filter
    assert _brute_feature_size(321, 16) == 21 and _brute_valid_fraction(24, 21) == pytest.approx(1 / 9)
    assert _brute_valid_fraction(18, 21) > 0.15
    assert {(p["crop_size"], p["aspp_rates"]) for p, _ in pruned} == {(321, (6, 12, 18, 24))}
    assert len(pruned) == 10 and len(kept) == 30
    assert all("rate 24" in reason and "21x21" in reason and "crop 321" in reason for _, reason in pruned)


@pytest.mark.parametrize("crop,rates,output_stride", [(65, (6,), 16), (65, (1, 2, 3), 16), (97, (6,), 16),
                                                      (97, (12,), 16), (65, (3,), 8), (129, (6, 12, 18), 16)])
def test_figure4_pruning_matches_brute_force(crop, rates, output_stride):
    cfg = ExperimentConfig(model=ModelConfig(backbone="resnet_tiny", aspp_rates=rates, output_stride=output_stride))
    cfg.data.crop_size = crop
    cfg.train.batch_size = 4
    size = _brute_feature_size(crop, output_stride)
    worst = min(_brute_valid_fraction(r * 16 // output_stride, size) for r in rates)
    reason = spaces.prune_reason(cfg, min_valid_weight=0.15, workers=2)
    assert (reason is not None) == (worst < 0.15 or size < 3), (crop, rates, worst, reason)
    if reason:
        assert "Fig. 4" in reason or "too small" in reason


def test_crop_too_small_for_output_stride_is_pruned_with_reason():
    cfg = ExperimentConfig(model=ModelConfig(backbone="resnet_tiny", aspp_rates=(2, 2, 2), output_stride=32))
    cfg.data.crop_size = 33
    reason = spaces.prune_reason(cfg, 0.15, 2)
    assert "crop 33 at output stride 32" in reason and "crop >= 65" in reason
    cfg.data.crop_size = 65
    assert spaces.prune_reason(cfg, 0.15, 2) is None


def test_impossible_model_config_is_pruned_with_configerror_message():
    base = ExperimentConfig(model=ModelConfig(backbone="resnet_tiny"))
    kept, pruned = spaces.prune([{"aspp_rates": (3, 6, 9), "output_stride": 32}, {"aspp_rates": (2, 4, 6)}],
                                base, 0.0, 2)
    assert kept == [{"aspp_rates": (2, 4, 6)}]
    assert "cannot be halved for output_stride 32" in pruned[0][1]


def test_batch_of_one_per_worker_is_pruned_where_bn_would_see_one_value():
    base = ExperimentConfig(model=ModelConfig(backbone="resnet_tiny"))
    base.train.batch_size = 4
    kept, _ = spaces.prune([{"crop_size": 513}], base, 0.15, workers=4)  # synchronized BN over 4 workers
    assert kept == [{"crop_size": 513}]
    base.train.batch_size, base.cluster.num_workers = 1, 1
    _, pruned = spaces.prune([{"crop_size": 513}], base, 0.15, workers=1)
    assert "1 image per worker" in pruned[0][1]


def test_yaml_space_grid_and_sample(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("multi_grid: [[1, 2, 1], [1, 2, 4]]\ncrop_size: [65, 97]\nlr: {loguniform: [0.001, 0.1]}\n"
                 "model.aspp_channels: [16]\n")
    space = spaces.load_space(str(f))
    with pytest.raises(ConfigError, match="ranges"):
        spaces.expand(space, "grid")
    points = spaces.expand(space, "sample", num_samples=4, seed=3)
    assert len(points) == 4
    assert len({(p["multi_grid"], p["crop_size"]) for p in points}) == 4  # distinct while the grid allows
    assert all(0.001 <= p["lr"] <= 0.1 and p["model.aspp_channels"] == 16 for p in points)
    assert points == spaces.expand(space, "sample", num_samples=4, seed=3)  # reproducible
    cfg = spaces.apply_point(ExperimentConfig(), points[0])
    assert (cfg.train.lr == points[0]["lr"] and cfg.model.aspp_channels == 16
            and cfg.data.crop_size == points[0]["crop_size"])

    grid = spaces.expand({"crop_size": [65, 97], "aspp_rates": [(1, 2, 3)]}, "grid", num_samples=2, seed=5)
    assert [(p["crop_size"], p["seed"]) for p in grid] == [(65, 5), (97, 5), (65, 6), (97, 6)]


@pytest.mark.parametrize("text,match", [("nonsense_key: [1]\n", "unknown"), ("crop_size: 5\n", "list of values"),
                                        ("lr: {loguniform: [0, 1]}\n", "0 < low < high"), ("- 1\n", "mapping")])
def test_bad_space_files_name_the_problem(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        spaces.load_space(str(f))


def test_missing_space_file_and_inline_space():
    with pytest.raises(ConfigError, match="neither a preset"):
        spaces.load_space("no/such/space.yaml")
    assert spaces.load_space({"crop_size": [65]}) == {"crop_size": [65]}


def test_describe_reads_like_the_papers_rows():
    p = {"multi_grid": (1, 2, 4), "aspp_rates": (6, 12, 18), "image_pooling": True, "crop_size": 513,
         "output_stride": 16}
    assert spaces.describe(p) == "MG(1,2,4) ASPP(6,12,18)+IP crop 513 OS16"


def test_explicit_points(tmp_path):
    f = tmp_path / "points.yaml"
    f.write_text("points:\n  - {crop_size: 65, aspp_rates: [1, 2, 3]}\n  - {lr: 1.0e+6}\n")
    points = spaces.expand(spaces.load_space(str(f)))
    assert points == [{"crop_size": 65, "aspp_rates": (1, 2, 3)}, {"lr": 1e6}]
    with pytest.raises(ConfigError, match="cannot be mixed"):
        spaces.load_space({"points": [{"lr": 0.1}], "crop_size": [65]})
    with pytest.raises(ConfigError, match="unknown"):
        spaces.load_space({"points": [{"bogus": 1}]})
