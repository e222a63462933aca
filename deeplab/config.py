"""One config system for every entry point: dataclasses loaded from YAML, overridden on the command line.

An experiment file has sections ``model``, ``data``, ``train``, ``cluster``, ``tune``, ``export``, ``segment``
and ``serve``; each maps onto one dataclass below. ``--set section.field=value`` overrides any field from any
command.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .cli import UserError

# Backbone depth -> units per block (block1..block4). "resnet_tiny" is a narrow, shallow bottleneck
# ResNet for tests and CPU demos whose behaviour does not depend on depth.
BACKBONE_LAYERS = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
    "resnet_tiny": (1, 1, 1, 1),
}
BACKBONE_WIDTH = {"resnet50": 64, "resnet101": 64, "resnet152": 64, "resnet_tiny": 8}
OUTPUT_STRIDES = (8, 16, 32)
HEADS = ("paper", "torchvision")


class ConfigError(UserError, ValueError):
    """A config value a user wrote is not allowed; the message names the field and what is allowed."""


@dataclass
class ModelConfig:
    """The whole model's options. Defaults are the paper's best ASPP model (Table 5, 77.21 mIoU)."""

    backbone: str = "resnet101"
    num_classes: int = 21
    output_stride: int = 16
    multi_grid: tuple = (1, 2, 4)
    aspp_rates: tuple = (6, 12, 18)  # given for output stride 16; doubled at 8, halved at 32
    image_pooling: bool = True
    cascade_blocks: int = 0  # 0-3: the paper's block5..block7 (Section 3.2)
    head: str = "paper"  # "paper" | "torchvision" (extra 3x3 conv + dropout, for torchvision weights)
    aux_head: bool = False  # torchvision's FCN auxiliary head on block3
    aspp_channels: int = 256

    def __post_init__(self):
        self.multi_grid = tuple(int(r) for r in self.multi_grid)
        self.aspp_rates = tuple(int(r) for r in self.aspp_rates)
        if self.backbone not in BACKBONE_LAYERS:
            raise ConfigError(f"model.backbone={self.backbone!r} is unknown; allowed: {', '.join(BACKBONE_LAYERS)}")
        if self.output_stride not in OUTPUT_STRIDES:
            raise ConfigError(f"model.output_stride={self.output_stride} is not allowed; use one of 8, 16, 32")
        if len(self.multi_grid) != 3 or any(r < 1 for r in self.multi_grid):
            raise ConfigError(f"model.multi_grid={list(self.multi_grid)} must be 3 unit rates >= 1, e.g. [1, 2, 4]")
        if any(r < 1 for r in self.aspp_rates):
            raise ConfigError(f"model.aspp_rates={list(self.aspp_rates)}: every atrous rate must be >= 1")
        if any(r % 2 for r in self.aspp_rates) and self.output_stride == 32:
            raise ConfigError(f"model.aspp_rates={list(self.aspp_rates)} cannot be halved for output_stride 32; use even rates")
        if not 0 <= self.cascade_blocks <= 3:
            raise ConfigError(f"model.cascade_blocks={self.cascade_blocks} must be 0-3 (block5..block7)")
        if self.head not in HEADS:
            raise ConfigError(f"model.head={self.head!r} is unknown; allowed: {', '.join(HEADS)}")
        if self.num_classes < 1:
            raise ConfigError(f"model.num_classes={self.num_classes} must be >= 1")
        if self.head == "torchvision" and (self.multi_grid != (1, 1, 1) or self.cascade_blocks):
            raise ConfigError("model.head='torchvision' has no Multi-Grid or cascaded blocks: "
                              "set multi_grid [1, 1, 1] and cascade_blocks 0")

    def rates_at(self, output_stride: Optional[int] = None) -> tuple:
        """ASPP rates at an output stride: the configured (OS16) rates scaled by 16 / output_stride."""
        os_ = output_stride or self.output_stride
        return tuple(r * 16 // os_ for r in self.aspp_rates)


@dataclass
class DataConfig:
    """Where images come from and how they are augmented (the paper's protocol by default)."""

    dataset: str = "synthetic"  # synthetic | voc | cityscapes | ade20k | folder
    root: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    crop_size: int = 513
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    ignore_index: int = 255
    loader_workers: int = 2
    num_classes: Optional[int] = None  # folder datasets without a classes.txt
    # synthetic dataset
    synthetic_size: int = 513  # side of generated images
    synthetic_train: int = 1000
    synthetic_val: int = 100
    synthetic_classes: int = 6
    seed: int = 0
    # bootstrapping (paper Section 4.3): repeat images containing these class ids
    bootstrap_classes: tuple = ()
    bootstrap_repeat: int = 1
    val_size: Optional[int] = None  # pad/crop val images to this for batching (None: whole image, batch 1)


@dataclass
class TrainConfig:
    """The paper's training protocol (Section 4.1); batch_size is the global batch across workers."""

    batch_size: int = 16
    max_iterations: int = 30000
    lr: float = 0.007
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    freeze_bn: bool = False
    bn_momentum: Optional[float] = None  # None: PyTorch's 0.1; the paper's BN decay 0.9997 is 0.0003
    init_from: Optional[str] = None  # checkpoint to start from (stage 2)
    pretrained_backbone: Optional[str] = None  # ImageNet ResNet .pth with torchvision keys
    amp: str = "auto"  # auto | bf16 | fp16 | off
    channels_last: bool = True
    eval_interval: int = 1000
    log_interval: int = 20
    seed: int = 0


@dataclass
class ClusterConfig:
    """How the run is laid out on Ray."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1
    storage_path: str = "runs"
    name: str = "deeplabv3"
    max_failures: int = 3
    collective_timeout_s: int = 120
    placement_strategy: str = "PACK"
    address: Optional[str] = None  # None: RAY_ADDRESS or an existing cluster, else a local one


@dataclass
class TuneConfig:
    """What Ray Tune searches and how it schedules trials."""

    space: str = "paper"  # a preset name or a YAML file
    num_samples: int = 1
    scheduler: str = "asha"  # asha | fifo
    workers_per_trial: int = 2
    max_concurrent: int = 1
    max_iterations: Optional[int] = None
    grace_period: int = 1  # evaluations before ASHA may stop a trial
    reduction_factor: int = 2
    metric: str = "val_miou"
    output: str = "best.ckpt"
    name: str = "search"
    mode: str = "grid"  # grid: every combination of the space | sample: num_samples random picks from it
    min_valid_weight: float = 0.15  # prune ASPP rates whose 3x3 filter keeps less (1/9: a 1x1 filter; Fig. 4)
    max_failures: int = 2  # retries of a trial whose driver died (lost node); divergence is never retried


@dataclass
class ExportConfig:
    """ONNX / TensorRT export and benchmarking defaults."""

    output_stride: int = 8
    dynamic: bool = True
    opset: Optional[int] = None
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8
    workspace_gb: float = 4.0
    min_shape: str = "1x3x257x257"
    opt_shape: str = "1x3x513x513"
    max_shape: str = "4x3x1025x1025"
    calib_images: int = 32
    max_int8_miou_drop: float = 1.0
    image_size: int = 513
    tolerance: float = 1e-3  # ONNX vs PyTorch: max |logit diff| / max(1, |largest logit|)
    accuracy_images: int = 16  # held-out images for --check-accuracy (FP32 vs INT8/FP16 mIoU)

    PRECISIONS = ("fp32", "fp16", "bf16", "int8")

    def __post_init__(self):
        if self.output_stride not in OUTPUT_STRIDES:
            raise ConfigError(f"export.output_stride={self.output_stride} is not allowed; use one of 8, 16, 32")
        if self.precision not in self.PRECISIONS:
            raise ConfigError(f"export.precision={self.precision!r} is unknown; allowed: {', '.join(self.PRECISIONS)}")
        for name in ("workspace_gb", "tolerance", "calib_images", "image_size"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"export.{name}={getattr(self, name)} must be > 0")
        if self.accuracy_images < 0:
            raise ConfigError(f"export.accuracy_images={self.accuracy_images} must be >= 0")
        self.profile()

    @staticmethod
    def parse_shape(name: str, text: str) -> tuple:
        """'1x3x513x513' -> (1, 3, 513, 513); ConfigError naming export.<name> otherwise."""
        try:
            shape = tuple(int(p) for p in str(text).lower().replace(",", "x").split("x"))
        except ValueError:
            shape = ()
        if len(shape) != 4 or any(d < 1 for d in shape):
            raise ConfigError(f"export.{name}={text!r}: expected 4 positive sizes NxCxHxW, e.g. 1x3x513x513")
        if shape[1] != 3:
            raise ConfigError(f"export.{name}={text!r}: the model takes 3 channels (RGB), got {shape[1]}")
        return shape

    def profile(self) -> dict:
        """The TensorRT optimization profile {"min", "opt", "max"} as NCHW tuples, each dim min <= opt <= max."""
        shapes = {k: self.parse_shape(f"{k}_shape", getattr(self, f"{k}_shape")) for k in ("min", "opt", "max")}
        for i, dim in enumerate("NCHW"):
            lo, mid, hi = (shapes[k][i] for k in ("min", "opt", "max"))
            if not lo <= mid <= hi:
                raise ConfigError(f"export.min_shape/opt_shape/max_shape: {dim} must satisfy min <= opt <= max, "
                                  f"got {lo}, {mid}, {hi}")
        return shapes


def _check_number(section: str, name: str, value, low: float, integer: bool = False, strict: bool = False,
                  high: Optional[float] = None) -> None:
    """ConfigError naming SECTION.FIELD unless value is a number >= low (> low when strict, <= high)."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    ok = ok and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        what = "an integer" if integer else "a number"
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise ConfigError(f"{section}.{name}={value!r} must be {what} {bound}" + (f" and <= {high:g}" if high else ""))


@dataclass
class SegmentConfig:
    """Batch inference over an image collection with Ray Data (python -m cluster.segment)."""

    workers: Optional[int] = None  # model actors (None: as many as the cluster's CPUs or GPUs hold)
    batch_size: int = 4  # images per actor call; split into same-size groups, never resized
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    cpus_per_decode: float = 0.5  # each read + decode task
    output_stride: Optional[int] = None  # checkpoints only (None: the checkpoint's); exported models are fixed
    color: bool = False  # also NAME_color.png and NAME_overlay.png
    alpha: float = 0.5  # overlay opacity
    max_pixels: Optional[int] = None  # larger images fail (None: Pillow's decompression-bomb limit)
    progress_interval_s: float = 5.0

    def __post_init__(self):
        if self.workers is not None:
            _check_number("segment", "workers", self.workers, 1, integer=True)
        _check_number("segment", "batch_size", self.batch_size, 1, integer=True)
        for name in ("cpus_per_worker", "gpus_per_worker", "cpus_per_decode"):
            _check_number("segment", name, getattr(self, name), 0)
        if not self.cpus_per_worker and not self.gpus_per_worker:
            raise ConfigError("segment.cpus_per_worker=0 needs segment.gpus_per_worker > 0")
        if self.output_stride not in (None, *OUTPUT_STRIDES):
            raise ConfigError(f"segment.output_stride={self.output_stride} is not allowed; use one of 8, 16, 32")
        _check_number("segment", "alpha", self.alpha, 0, high=1)
        if self.max_pixels is not None:
            _check_number("segment", "max_pixels", self.max_pixels, 1, integer=True)
        _check_number("segment", "progress_interval_s", self.progress_interval_s, 0, strict=True)


@dataclass
class ServeConfig:
    """An HTTP endpoint on Ray Serve (python -m cluster.serve)."""

    host: str = "127.0.0.1"  # loopback unless you say otherwise
    port: int = 8000
    replicas: int = 1
    autoscale: Optional[tuple] = None  # (min, max) replicas: Serve scales between them (instead of replicas)
    max_batch_size: int = 8  # concurrent requests run as one batch (1: no batching)
    batch_wait_ms: float = 10.0  # how long a batch waits to fill
    cpus_per_replica: float = 1
    gpus_per_replica: float = 0
    output_stride: Optional[int] = None  # checkpoints only
    max_pixels: int = 4096 * 4096  # larger uploads answer 413
    max_upload_mb: float = 32.0

    def __post_init__(self):
        _check_number("serve", "port", self.port, 1, integer=True, high=65535)
        _check_number("serve", "replicas", self.replicas, 1, integer=True)
        if self.autoscale is not None:
            bounds = tuple(self.autoscale) if isinstance(self.autoscale, (list, tuple)) else ()
            if len(bounds) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds) or \
                    not 0 <= bounds[0] <= bounds[1] or bounds[1] < 1:
                raise ConfigError(f"serve.autoscale={self.autoscale!r}: expected [MIN, MAX] replicas with "
                                  "0 <= MIN <= MAX and MAX >= 1")
            if self.replicas != 1:
                raise ConfigError("serve.replicas and serve.autoscale: set one (a fixed count, or MIN and MAX)")
            self.autoscale = bounds
        _check_number("serve", "max_batch_size", self.max_batch_size, 1, integer=True)
        _check_number("serve", "batch_wait_ms", self.batch_wait_ms, 0)
        for name in ("cpus_per_replica", "gpus_per_replica"):
            _check_number("serve", name, getattr(self, name), 0)
        if self.output_stride not in (None, *OUTPUT_STRIDES):
            raise ConfigError(f"serve.output_stride={self.output_stride} is not allowed; use one of 8, 16, 32")
        _check_number("serve", "max_pixels", self.max_pixels, 1, integer=True)
        _check_number("serve", "max_upload_mb", self.max_upload_mb, 0, strict=True)


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict:
        return to_plain(self)


SECTION_CLASSES = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "cluster": ClusterConfig,
                   "tune": TuneConfig, "export": ExportConfig, "segment": SegmentConfig, "serve": ServeConfig}
SECTIONS = tuple(SECTION_CLASSES)


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists: what YAML and weights_only checkpoints can hold."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _default(cls, name):
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _build(cls, values: dict, where: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {k: tuple(v) if isinstance(v, list) and isinstance(_default(cls, k), tuple) else v
              for k, v in values.items()}
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def model_config_from_dict(values: dict) -> ModelConfig:
    return _build(ModelConfig, values, "model")


def experiment_from_dict(values: dict, where: str = "config") -> ExperimentConfig:
    values = values or {}
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return ExperimentConfig(**{name: _build(cls, values.get(name), f"{where}: {name}")
                               for name, cls in SECTION_CLASSES.items()})


def _parse_value(text: str):
    """A command-line value as YAML would read it: 8 -> int, [6,12,18] -> list, null -> None."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(values: dict, overrides: list) -> dict:
    """Apply ``section.field=value`` strings to a plain config dict (in place) and return it."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in SECTIONS:
            raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE with SECTION one of {', '.join(SECTIONS)}")
        values.setdefault(section, {})
        if values[section] is None:
            values[section] = {}
        values[section][name] = _parse_value(raw)
    return values


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> ExperimentConfig:
    """Read a YAML experiment file (None: the embedded defaults) and apply ``--set`` overrides."""
    values: dict = {}
    where = "defaults"
    if path:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: expected a mapping of sections, got {type(values).__name__}")
    apply_overrides(values, overrides or [])
    return experiment_from_dict(values, where)


def save_config(cfg: ExperimentConfig, path) -> None:
    """Write a config as YAML atomically."""
    from .fileio import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


@dataclass(frozen=True)
class Alias:
    """A shorthand flag for one config field: ``--num-workers 4`` means ``--set cluster.num_workers=4``.

    The value goes through the same override path as ``--set`` (parsed as YAML, checked by the section's
    dataclass), so a flag and its field can never disagree. ``switch``: a flag without a value that sets the
    field to true; ``nargs="+"``: several values become a YAML list.
    """

    flag: str
    key: str  # SECTION.FIELD
    help: str = ""
    nargs: Optional[str] = None
    switch: bool = False
    metavar: Optional[str] = None

    def default(self):
        section, name = self.key.split(".", 1)
        return _default(SECTION_CLASSES[section], name)

    def override(self, value) -> Optional[str]:
        """The ``SECTION.FIELD=VALUE`` text for a parsed command-line value (None: flag not given)."""
        if value is None:
            return None
        if self.switch:
            return f"{self.key}=true"
        if isinstance(value, list):
            return f"{self.key}=[{', '.join(value)}]"
        return f"{self.key}={value}"


def add_config_args(parser: argparse.ArgumentParser, required: bool = False, aliases=()) -> None:
    """The config flags every command shares: --config FILE, repeated --set SECTION.FIELD=VALUE, and the
    command's shorthand ``aliases`` (each one config field; --help shows the field and its default)."""
    parser.add_argument("--config", required=required,
                        help="experiment YAML (sections model/data/train/cluster/tune/export/segment/serve)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field, e.g. --set model.output_stride=8 (repeatable)")
    for alias in aliases:
        section, name = alias.key.split(".", 1)
        if section not in SECTION_CLASSES or name not in {f.name for f in fields(SECTION_CLASSES[section])}:
            raise ValueError(f"alias {alias.flag}: {alias.key} is not a config field")
        text = f"{alias.help} ({alias.key}; config default: {alias.default()})".lstrip()
        if alias.switch:
            parser.add_argument(alias.flag, action="store_const", const=True, default=None, help=text)
        else:
            parser.add_argument(alias.flag, nargs=alias.nargs, default=None, metavar=alias.metavar, help=text)
    parser.set_defaults(_config_aliases=tuple(aliases))


def config_overrides(args: argparse.Namespace) -> list:
    """``--set`` items followed by the shorthand flags given, all as SECTION.FIELD=VALUE (later ones win)."""
    items = list(getattr(args, "overrides", None) or [])
    for alias in getattr(args, "_config_aliases", ()):
        dest = alias.flag.lstrip("-").replace("-", "_")
        item = alias.override(getattr(args, dest, None))
        if item is not None:
            items.append(item)
    return items


def config_from_args(args: argparse.Namespace, base: Optional[ExperimentConfig] = None) -> ExperimentConfig:
    """The experiment a command runs: ``--config`` (else ``base``, e.g. a checkpoint's own experiment, else the
    defaults), then ``--set`` and the shorthand flags, through one override path."""
    if getattr(args, "config", None) or base is None:
        return load_config(getattr(args, "config", None), config_overrides(args))
    values = apply_overrides(base.to_dict(), config_overrides(args))
    return experiment_from_dict(values, "checkpoint config")
