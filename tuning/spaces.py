"""Search spaces: named presets or YAML, expanded into concrete points and pruned before they cost a GPU-hour.

A space maps a name to the values to try. Short names cover what the paper varies; any other config field
is reachable as ``section.field``::

    multi_grid: [[1, 1, 1], [1, 2, 1], [1, 2, 4]]     # model.multi_grid
    aspp_rates: [[6, 12, 18], [6, 12, 18, 24]]       # model.aspp_rates (given at output stride 16)
    image_pooling: [true, false]                     # model.image_pooling
    crop_size: [321, 513]                            # data.crop_size
    output_stride: [16]                              # model.output_stride
    cascade_blocks: [0]                              # model.cascade_blocks
    lr: [0.007]                                      # train.lr; in sample mode also {loguniform: [1e-4, 1e-2]}

A space may instead list whole configurations, ``points: [{crop_size: 513, lr: 0.007}, ...]``.
``grid`` mode runs every combination (``num_samples`` times, each repeat with the next seed); ``sample`` mode
draws ``num_samples`` points. A point is a plain dict {short name: value}; it becomes a full ExperimentConfig
with :func:`apply_point`. :func:`prune` drops points that cannot work and says why.
"""
from __future__ import annotations

import copy
import itertools
import math
import random
from pathlib import Path
from typing import Optional

import yaml

from deeplab.cli import error_line
from deeplab.config import SECTION_CLASSES, ConfigError, ExperimentConfig, experiment_from_dict, to_plain
from deeplab.receptive import degenerate_rates, feature_size
from deeplab.train_batch import per_worker_batch

# short name -> (section, field); the paper's knobs plus the optional ones the issue names
SHORT_NAMES = {
    "multi_grid": ("model", "multi_grid"),
    "aspp_rates": ("model", "aspp_rates"),
    "image_pooling": ("model", "image_pooling"),
    "output_stride": ("model", "output_stride"),
    "cascade_blocks": ("model", "cascade_blocks"),
    "crop_size": ("data", "crop_size"),
    "lr": ("train", "lr"),
    "seed": ("train", "seed"),
}

# The paper's grid (Tables 3 and 5, and the appendix's crop study): Multi-Grid x ASPP x image pooling x crop,
# at output stride 16.
PAPER = {
    "multi_grid": [[1, 1, 1], [1, 2, 1], [1, 2, 3], [1, 2, 4], [2, 2, 2]],
    "aspp_rates": [[6, 12, 18], [6, 12, 18, 24]],
    "image_pooling": [True, False],
    "crop_size": [321, 513],
    "output_stride": [16],
}

PRESETS = {"paper": PAPER}
MODES = ("grid", "sample")
DISTRIBUTIONS = ("uniform", "loguniform")


def _where(key: str, where: str = "search space") -> tuple:
    if key in SHORT_NAMES:
        return SHORT_NAMES[key]
    section, dot, name = key.partition(".")
    if not dot or section not in SECTION_CLASSES:
        raise ConfigError(f"{where}: key {key!r} is unknown; use one of {', '.join(SHORT_NAMES)} "
                          f"or SECTION.FIELD with SECTION one of {', '.join(SECTION_CLASSES)}")
    return section, name


def _check_points(points, where: str) -> dict:
    if not isinstance(points, list) or not points or not all(isinstance(p, dict) and p for p in points):
        raise ConfigError(f"{where}: points: expected a non-empty list of mappings name -> value")
    for p in points:
        for key in p:
            _where(key, where)
    return {"points": [{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()} for p in points]}


def _check_space(space: dict, where: str) -> dict:
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}: a search space is a non-empty mapping of name -> list of values")
    if "points" in space:
        if len(space) > 1:
            raise ConfigError(f"{where}: 'points' lists whole configurations; it cannot be mixed with other keys")
        return _check_points(space["points"], where)
    out = {}
    for key, values in space.items():
        _where(key, where)
        if isinstance(values, dict):
            dist, bounds = next(iter(values.items())) if len(values) == 1 else (None, None)
            if dist not in DISTRIBUTIONS or not (isinstance(bounds, list) and len(bounds) == 2):
                raise ConfigError(f"{where}: {key}: a range is written {{loguniform: [low, high]}} "
                                  f"or {{uniform: [low, high]}}")
            low, high = (float(b) for b in bounds)
            if not low < high or (dist == "loguniform" and low <= 0):
                raise ConfigError(f"{where}: {key}: {dist} needs 0 < low < high, got {bounds}")
            out[key] = {dist: [low, high]}
        elif isinstance(values, list) and values:
            out[key] = [tuple(v) if isinstance(v, list) else v for v in values]
        else:
            raise ConfigError(f"{where}: {key}: expected a non-empty list of values or a range, got {values!r}")
    return out


def load_space(spec) -> dict:
    """A preset name (``paper``), a YAML file, or a mapping written inline in the experiment config's
    ``tune.space`` -> {name: list of values | {dist: [low, high]}}."""
    if isinstance(spec, dict):
        return _check_space(copy.deepcopy(spec), "tune.space")
    if spec in PRESETS:
        return _check_space(copy.deepcopy(PRESETS[spec]), f"preset {spec!r}")
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--space {spec}: neither a preset ({', '.join(PRESETS)}) nor an existing YAML file")
    try:
        space = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({error_line(e)})") from None
    return _check_space(space, str(path))


def expand(space: dict, mode: str = "grid", num_samples: int = 1, seed: int = 0) -> list:
    """Concrete points. grid: the product of every list, repeated num_samples times with seeds seed, seed+1, ...
    sample: num_samples draws (distinct while the discrete product allows), ranges drawn per point."""
    if mode not in MODES:
        raise ConfigError(f"tune.mode={mode!r} is unknown; use grid or sample")
    if num_samples < 1:
        raise ConfigError(f"tune.num_samples={num_samples} must be >= 1")
    if "points" in space:  # explicit configurations: grid runs each, sample draws from them
        grid = [dict(p) for p in space["points"]]
        space = {}
    else:
        grid = None
    ranges = {k: v for k, v in space.items() if isinstance(v, dict)}
    lists = {k: v for k, v in space.items() if not isinstance(v, dict)}
    if mode == "grid":
        if ranges:
            raise ConfigError(f"space key(s) {', '.join(ranges)} are ranges: use tune.mode=sample, or list values")
        grid = grid or [dict(zip(lists, combo)) for combo in itertools.product(*lists.values())]
        if num_samples == 1:
            return grid
        return [{**p, "seed": seed + i} for i in range(num_samples) for p in grid]
    rng = random.Random(seed)
    grid = grid or [dict(zip(lists, combo)) for combo in itertools.product(*lists.values())]
    picks = (rng.sample(grid, num_samples) if num_samples <= len(grid)
             else [rng.choice(grid) for _ in range(num_samples)])
    points = []
    for p in picks:
        p = dict(p)
        for key, rng_spec in ranges.items():
            dist, (low, high) = next(iter(rng_spec.items()))
            x = rng.uniform(math.log(low), math.log(high)) if dist == "loguniform" else rng.uniform(low, high)
            p[key] = float(f"{math.exp(x) if dist == 'loguniform' else x:.4g}")
        points.append(p)
    return points


def apply_point(base: ExperimentConfig, point: dict) -> ExperimentConfig:
    """The base config with a point's values set; raises ConfigError for an impossible combination."""
    values = to_plain(base)
    for key, value in point.items():
        section, name = _where(key)
        values[section][name] = to_plain(value)
    return experiment_from_dict(values, where="search point")


def describe(point: dict) -> str:
    """A short label for tables, plots and logs: MG(1,2,4) ASPP(6,12,18)+IP crop 513 OS16."""
    def tup(v):
        return "(" + ",".join(str(x) for x in v) + ")"
    parts = []
    if "multi_grid" in point:
        parts.append(f"MG{tup(point['multi_grid'])}")
    if "aspp_rates" in point:
        parts.append(f"ASPP{tup(point['aspp_rates'])}" + ("+IP" if point.get("image_pooling", True) else ""))
    elif "image_pooling" in point:
        parts.append("IP" if point["image_pooling"] else "no IP")
    for key, fmt in (("crop_size", "crop {}"), ("output_stride", "OS{}"), ("cascade_blocks", "block{}"),
                     ("lr", "lr {:g}"), ("seed", "seed {}")):
        if key in point:
            parts.append(fmt.format(point[key] + 4 if key == "cascade_blocks" else point[key]))
    parts += [f"{k}={v}" for k, v in point.items() if k not in SHORT_NAMES]
    return " ".join(parts)


def prune_reason(cfg: ExperimentConfig, min_valid_weight: float, workers: int) -> Optional[str]:
    """Why a fully built config cannot work, or None. Checks what costs nothing to check."""
    os_, crop = cfg.model.output_stride, cfg.data.crop_size
    size = feature_size(crop, os_, cfg.model.backbone)
    if size < 3:
        return (f"crop {crop} at output stride {os_} gives a {size}x{size} feature map, too small for 3x3 "
                f"filters; use crop >= {2 * os_ + 1}")
    bad = degenerate_rates(cfg.model.rates_at(16), crop, os_, min_valid_weight, cfg.model.backbone)  # none without ASPP
    if bad:
        rate, frac = bad[0]
        return (f"ASPP rate {rate} keeps {frac:.0%} of its 3x3 weights on the {size}x{size} feature map of crop "
                f"{crop} at output stride {os_} (< tune.min_valid_weight {min_valid_weight:.0%}): "
                f"it degenerates towards a 1x1 filter (paper Fig. 4)")
    try:
        per_worker_batch(cfg.train.batch_size, workers, synchronized_bn=workers > 1, frozen_bn=cfg.train.freeze_bn)
    except ConfigError as e:
        return str(e)
    return None


def prune(points: list, base: ExperimentConfig, min_valid_weight: float, workers: int) -> tuple:
    """Split points into (kept, pruned); pruned is a list of (point, reason)."""
    kept, pruned = [], []
    for p in points:
        try:
            reason = prune_reason(apply_point(base, p), min_valid_weight, workers)
        except ConfigError as e:
            reason = str(e)
        (pruned.append((p, reason)) if reason else kept.append(p))
    return kept, pruned
