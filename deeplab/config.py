"""One config system for every entry point: dataclasses loaded from YAML, overridden on the command line.

An experiment file has sections ``model``, ``data``, ``train``, ``cluster``, ``tune``, ``export``, ``segment``
and ``serve``; each maps onto one dataclass below. ``--set section.field=value`` overrides any field from any
command.

A config that builds is valid: each section checks its own fields when it is built (types first, then
values), and ``ExperimentConfig`` checks what spans sections. So every mistake a config can hold is answered
on the driver, in one line naming the field, the value and what is allowed, before Ray starts. A ConfigError
from a file names the file; one from ``--set`` (or a shorthand flag) names that item. Paths that must exist
are checked only when a command builds its config from the command line (`load_config`, `config_from_args`):
a checkpoint's own experiment must still load on a machine that lacks its training paths.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Optional, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

from .backbones import backbone_names, backbone_spec
from .cli import UserError
from .fileio import write_text_atomic

OUTPUT_STRIDES = (8, 16, 32)  # what inference and export switch between
MODEL_STRIDES = (4, 8, 16, 32, 64, 128, 256)  # the paper's Table 1; 64-256 carried by cascaded blocks 5-7
HEADS = ("paper", "torchvision")
# Where atrous rates go once strides are removed (deeplab.model.block_layout): "exact" (the OS16 <-> OS8 switch is
# an exact densification), "torchvision" (its _make_layer), "legacy" (checkpoints written before it was recorded).
ATROUS_LAYOUTS = ("exact", "torchvision", "legacy")
DATASETS = ("synthetic", "voc", "cityscapes", "ade20k", "folder")
SYNTHETIC_MAX_CLASSES = 12  # background + the 11 shapes of deeplab.data.synthetic
AMP_MODES = ("auto", "bf16", "fp16", "off")
GRAD_COMPRESSIONS = ("none", "bf16")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
SCHEDULERS = ("asha", "fifo")
SEARCH_MODES = ("grid", "sample")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


class ConfigError(UserError, ValueError):
    """A config value a user wrote is not allowed; the message names the field and what is allowed.
    ``fields``: the SECTION.FIELD keys at fault, so the error can name the file or --set item they came from."""

    def __init__(self, message: str = "", fields: tuple = ()):
        super().__init__(message)
        self.fields = tuple(fields)


# ---------------------------------------------------------------------------------------------------------
# Checking one value: its type, then its range


def _show(value) -> str:
    """A value as a user wrote it: strings quoted (so 'fast' reads as text), lists in brackets, YAML words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def _fail(key: str, value, what: str):
    raise ConfigError(f"{key}={_show(value)} {what}", (key,))


def _describe(hint) -> str:
    """The type a field expects, in words for an error message."""
    args = get_args(hint)
    if get_origin(hint) is Union:
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if get_origin(hint) is tuple:
        return "a list of integers" if args[-1] is Ellipsis else f"a list of {len(args)} integers"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(hint, str(hint))


def _convert(value, hint) -> tuple:
    """(True, value as ``hint``) or (False, None). Lossless only: 16.0 is not an integer, 'fast' not a number;
    YAML's 1e-4 (read as text) is a number, a number is a string where a string belongs."""
    if get_origin(hint) is Union:
        for option in get_args(hint):
            if option is type(None):
                if value is None:
                    return True, None
                continue
            ok, converted = _convert(value, option)
            if ok:
                return True, converted
        return False, None
    if get_origin(hint) is tuple:
        args = get_args(hint)
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            return False, None
        items = [_convert(v, args[0]) for v in value]
        return (True, tuple(v for _, v in items)) if all(ok for ok, _ in items) else (False, None)
    if hint is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool) or value is None:
        return False, None
    if hint is int:
        return isinstance(value, int), value
    if hint is float:
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return isinstance(value, (int, float)), value  # an int stays as written (lr: 1)
    if hint is str:
        return isinstance(value, (str, int, float)), str(value) if isinstance(value, (str, int, float)) else None
    if hint is dict:
        return isinstance(value, dict), value
    return True, value


@functools.lru_cache(maxsize=None)
def _field_types(cls) -> dict:
    return get_type_hints(cls)


class _Section:
    """A config section: ``check()`` converts every field to its annotated type, then checks the values."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        hints = _field_types(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            ok, converted = _convert(value, hints[f.name])
            if not ok:
                _fail(self._key(f.name), value, f"must be {_describe(hints[f.name])}")
            setattr(self, f.name, converted)
        self.check_values()

    def check_values(self) -> None:
        """The section's own ranges and allowed words (its fields already have their types)."""

    def _key(self, name: str) -> str:
        return f"{self.SECTION}.{name}"

    def _need(self, ok: bool, name: str, what: str) -> None:
        if not ok:
            _fail(self._key(name), getattr(self, name), what)

    def _need_at_least(self, low, *names) -> None:
        for name in names:
            value = getattr(self, name)
            self._need(value is None or value >= low, name, f"must be >= {low}")

    def _need_one_of(self, name: str, allowed) -> None:
        self._need(getattr(self, name) in allowed, name, f"is unknown; allowed: {', '.join(map(str, allowed))}")


# ---------------------------------------------------------------------------------------------------------
# The sections


@dataclass
class ModelConfig(_Section):
    """The whole model's options. Defaults are the paper's best ASPP model (Table 5, 77.21 mIoU)."""

    SECTION: ClassVar[str] = "model"

    backbone: str = "resnet101"
    num_classes: int = 21
    output_stride: int = 16
    multi_grid: Tuple[int, ...] = (1, 2, 4)
    aspp_rates: Tuple[int, ...] = (6, 12, 18)  # given for output stride 16; doubled at 8, halved at 32
    image_pooling: bool = True
    aspp: bool = True  # false: the cascade-only head of Tables 1-3, logits by a 1x1 conv on the last block
    cascade_blocks: int = 0  # 0-3: the paper's block5..block7 (Section 3.2)
    head: str = "paper"  # "paper" | "torchvision" (extra 3x3 conv + dropout, for torchvision weights)
    aspp_channels: int = 256
    # The rule placing atrous rates (ATROUS_LAYOUTS); a checkpoint records the rule it was trained with.
    # null: "torchvision" for head torchvision, else "exact".
    atrous_layout: Optional[str] = None
    # Bilinear resizes (image pooling, logits, multi-scale inputs) with aligned corners, as the paper's
    # implementation: feature j of a 33x33 map sits on pixel 16j of a 513 input. null: true for head paper,
    # false for head torchvision (its published weights were trained so).
    align_corners: Optional[bool] = None

    def check_values(self) -> None:
        self._need_one_of("backbone", backbone_names())  # deeplab.backbones: the registry
        spec = backbone_spec(self.backbone)
        self._need(1 <= self.num_classes <= 255, "num_classes", "must be 1-255 (label 255 means ignore)")
        self._need(0 <= self.cascade_blocks <= 3, "cascade_blocks", "must be 0-3 (block5..block7)")
        self._need(spec.cascade or self.cascade_blocks == 0, "cascade_blocks",
                   f"must be 0: {self.backbone} has no cascaded blocks")
        self._need(spec.cascade or self.output_stride in spec.output_strides, "output_stride",
                   f"is not allowed for {self.backbone}; use one of {', '.join(map(str, spec.output_strides))}")
        self._need(self.output_stride in MODEL_STRIDES, "output_stride",
                   "is not allowed; use one of 4, 8, 16, 32 (64, 128, 256 with cascaded blocks)")
        deepest = 32 * 2 ** self.cascade_blocks  # block4 strides to 32, each cascaded block doubles it
        self._need(self.output_stride <= deepest, "output_stride",
                   f"needs cascaded blocks to carry it: model.cascade_blocks={self.cascade_blocks} reaches "
                   f"{deepest}; set cascade_blocks >= {int(math.log2(max(self.output_stride, 32) // 32))}")
        self._need(len(self.multi_grid) == 3 and min(self.multi_grid) >= 1, "multi_grid",
                   "must be 3 unit rates >= 1, e.g. [1, 2, 4]")
        self._need(len(self.aspp_rates) >= 1 and min(self.aspp_rates) >= 1, "aspp_rates",
                   "must be one or more atrous rates >= 1, e.g. [6, 12, 18]")
        if self.aspp:
            self._check_aspp_rates_scale()
        self._need_one_of("head", HEADS)
        if self.align_corners is None:
            self.align_corners = self.head == "paper"
        if self.atrous_layout is None:
            self.atrous_layout = "torchvision" if self.head == "torchvision" else "exact"
        self._need_one_of("atrous_layout", ATROUS_LAYOUTS)
        self._need_at_least(1, "aspp_channels")
        if self.head == "torchvision" and (self.multi_grid != (1, 1, 1) or self.cascade_blocks or not self.aspp):
            raise ConfigError("model.head='torchvision' has ASPP and no Multi-Grid or cascaded blocks: "
                              "set multi_grid [1, 1, 1], cascade_blocks 0 and aspp true", ("model.head",))
        self._need(self.atrous_layout != "torchvision" or self.multi_grid == (1, 1, 1), "atrous_layout",
                   "has no Multi-Grid: set model.multi_grid [1, 1, 1]")

    def _check_aspp_rates_scale(self) -> None:
        """The rates are given at OS16 and scaled by 16 / output_stride: beyond 16 they must divide."""
        step = max(1, self.output_stride // 16)
        if not any(r % step for r in self.aspp_rates):
            return
        working = sorted({-(-r // step) * step for r in self.aspp_rates})
        what = "cannot be halved for output_stride 32: use even rates" if step == 2 else \
            f"cannot be scaled to output_stride {self.output_stride} (x 1/{step}): use multiples of {step}"
        raise ConfigError(f"{self._key('aspp_rates')}={_show(self.aspp_rates)} {what}, e.g. {_show(working)}, or "
                          "model.aspp: false (the cascade-only head of Tables 1-3)",
                          (self._key("aspp_rates"), self._key("output_stride")))

    def rates_at(self, output_stride: Optional[int] = None) -> tuple:
        """ASPP rates at an output stride: the configured (OS16) rates scaled by 16 / output_stride; none
        without ASPP."""
        if not self.aspp:
            return ()
        os_ = output_stride or self.output_stride
        return tuple(r * 16 // os_ for r in self.aspp_rates)


@dataclass
class DataConfig(_Section):
    """Where images come from and how they are augmented (the paper's protocol by default)."""

    SECTION: ClassVar[str] = "data"

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
    bootstrap_classes: Tuple[int, ...] = ()
    bootstrap_repeat: int = 1
    # pad val images to this size for batching (None: whole image, batch 1); an int or [height, width]
    val_size: Optional[Union[int, Tuple[int, int]]] = None

    def check_values(self) -> None:
        self._need_one_of("dataset", DATASETS)
        for name in ("train_split", "val_split"):
            self._need(bool(getattr(self, name)), name, "must name a split")
        self._need_at_least(1, "crop_size", "synthetic_size", "synthetic_train", "synthetic_val",
                            "bootstrap_repeat", "num_classes")
        self._need(self.scale_min > 0, "scale_min", "must be > 0")
        if self.scale_max < self.scale_min:
            raise ConfigError(f"data.scale_min={self.scale_min}, data.scale_max={self.scale_max}: need "
                              "0 < scale_min <= scale_max", ("data.scale_min", "data.scale_max"))
        self._need(0 <= self.ignore_index <= 255, "ignore_index", "must be 0-255 (masks are 8-bit)")
        self._need_at_least(0, "loader_workers", "seed")
        self._need(2 <= self.synthetic_classes <= SYNTHETIC_MAX_CLASSES, "synthetic_classes",
                   f"must be 2-{SYNTHETIC_MAX_CLASSES} (background + shapes)")
        self._need(all(0 <= c <= 254 for c in self.bootstrap_classes), "bootstrap_classes", "must be class ids 0-254")
        sizes = self.val_size if isinstance(self.val_size, tuple) else (self.val_size,)
        self._need(self.val_size is None or min(sizes) >= 1, "val_size",
                   "must be >= 1 (or null: whole images, batch 1)")


@dataclass
class TrainConfig(_Section):
    """The paper's training protocol (Section 4.1); batch_size is the global batch across workers."""

    SECTION: ClassVar[str] = "train"

    batch_size: int = 16
    max_iterations: int = 30000
    lr: float = 0.007
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    freeze_bn: bool = False  # stage 2: BatchNorm keeps its statistics and affine parameters the whole run
    bn_momentum: Optional[float] = 0.0003  # 1 - the paper's BN decay 0.9997; null: PyTorch's 0.1
    init_from: Optional[str] = None  # checkpoint to start from (stage 2)
    pretrained_backbone: Optional[str] = None  # ImageNet ResNet .pth with torchvision keys
    amp: str = "auto"  # auto | bf16 | fp16 | off
    channels_last: bool = True
    eval_interval: int = 1000
    log_interval: int = 20
    seed: int = 0

    def check(self) -> None:
        if self.amp is False:  # YAML reads a bare `off` as false
            self.amp = "off"
        super().check()

    def check_values(self) -> None:
        self._need_at_least(1, "batch_size", "max_iterations", "eval_interval", "log_interval")
        self._need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a learning rate > 0, e.g. 0.007")
        self._need(0 <= self.momentum < 1, "momentum", "must be in [0, 1), e.g. 0.9")
        self._need(0 <= self.weight_decay < math.inf, "weight_decay", "must be >= 0, e.g. 0.0001")
        self._need(0 <= self.poly_power < math.inf, "poly_power", "must be >= 0, e.g. 0.9")
        self._need(self.bn_momentum is None or 0 < self.bn_momentum <= 1, "bn_momentum",
                   "must be in (0, 1] (1 - the BN decay; the paper's 0.9997 is 0.0003) or null")
        self._need_one_of("amp", AMP_MODES)
        self._need_at_least(0, "seed")


@dataclass
class ClusterConfig(_Section):
    """How the run is laid out on Ray."""

    SECTION: ClassVar[str] = "cluster"

    # N workers, or [MIN, MAX] (--num-workers MIN-MAX): elastic, starts once MIN fit, grows to MAX as nodes join
    num_workers: Union[int, Tuple[int, int]] = 2
    resize_interval_s: float = 60.0  # elastic: how often Ray looks for room to grow the worker group
    use_gpu: bool = False
    cpus_per_worker: float = 1
    storage_path: str = "runs"
    name: str = "deeplabv3"
    max_failures: int = 3
    collective_timeout_s: int = 120
    placement_strategy: str = "PACK"
    address: Optional[str] = None  # None: RAY_ADDRESS or an existing cluster, else a local one
    ddp_bucket_mb: float = 25.0  # DDP's gradient all-reduce bucket (torch's default 25)
    grad_compression: str = "none"  # none | bf16: DDP all-reduces bf16 gradients (half the bytes; not exact)

    def check(self) -> None:
        text = self.num_workers
        if isinstance(text, str) and text.count("-") == 1 and text.replace("-", "").strip().isdigit():
            self.num_workers = [int(n) for n in text.split("-")]  # the --num-workers MIN-MAX form
        super().check()

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    def check_values(self) -> None:
        self._need(self.min_workers >= 1, "num_workers", "must be >= 1")
        self._need(self.min_workers <= self.max_workers, "num_workers", "must be a range MIN-MAX with MIN <= MAX")
        if self.min_workers == self.max_workers:
            self.num_workers = self.min_workers  # [4, 4] is a fixed group of 4
        self._need(self.resize_interval_s >= 0, "resize_interval_s", "must be >= 0")
        self._need_at_least(1, "collective_timeout_s")
        self._need(0 < self.cpus_per_worker < math.inf, "cpus_per_worker", "must be > 0")
        self._need(bool(self.storage_path), "storage_path", "must name a folder or a URI (s3://...)")
        self._need(bool(self.name) and "/" not in self.name, "name", "must be a folder name (no '/')")
        self._need_at_least(-1, "max_failures")  # -1: retry forever, as in Ray
        self._need_one_of("placement_strategy", PLACEMENT_STRATEGIES)
        self._need(0 < self.ddp_bucket_mb < math.inf, "ddp_bucket_mb", "must be > 0 (MB), e.g. 25")
        self._need_one_of("grad_compression", GRAD_COMPRESSIONS)


# Scalars deeplab.engine reports at every evaluation, which a search can rank trials by (tune.metric).
SEARCH_METRICS = ("val_miou", "loss", "images_per_s", "lr", "iteration", "epoch")


@dataclass
class TuneConfig(_Section):
    """What Ray Tune searches and how it schedules trials."""

    SECTION: ClassVar[str] = "tune"

    space: Union[str, dict] = "paper"  # a preset name or a YAML file, or the space itself (a mapping)
    num_samples: int = 1
    scheduler: str = "asha"  # asha | fifo
    workers_per_trial: int = 2
    max_concurrent: int = 1
    max_iterations: Optional[int] = None
    grace_period: int = 1  # evaluations before ASHA may stop a trial
    reduction_factor: int = 2
    metric: str = "val_miou"  # what ASHA ranks trials by, each trial's kept checkpoint and the best trial
    metric_mode: str = "max"  # max | min: whether a higher metric is better
    output: str = "best.ckpt"
    name: str = "search"
    mode: str = "grid"  # grid: every combination of the space | sample: num_samples random picks from it
    min_valid_weight: float = 0.15  # prune ASPP rates whose 3x3 filter keeps less (1/9: a 1x1 filter; Fig. 4)
    max_failures: int = 2  # retries of a trial whose driver died (lost node); divergence is never retried

    def check_values(self) -> None:
        self._need(bool(self.space), "space", "must name a preset or a YAML file, or be a non-empty mapping")
        self._need_at_least(1, "num_samples", "workers_per_trial", "max_concurrent", "max_iterations",
                            "grace_period")
        self._need_one_of("scheduler", SCHEDULERS)
        self._need_one_of("mode", SEARCH_MODES)
        self._need(self.reduction_factor >= 2, "reduction_factor", "must be >= 2 (ASHA keeps 1/reduction_factor)")
        self._need(self.metric in SEARCH_METRICS, "metric",
                   f"is not a metric training reports; use one of {', '.join(SEARCH_METRICS)}")
        self._need_one_of("metric_mode", ("max", "min"))
        self._need(bool(self.output), "output", "must name the file best.ckpt is copied to")
        self._need(bool(self.name) and "/" not in self.name, "name", "must be a folder name (no '/')")
        self._need(0 <= self.min_valid_weight <= 1, "min_valid_weight", "must be in [0, 1]")
        self._need_at_least(-1, "max_failures")


@dataclass
class ExportConfig(_Section):
    """ONNX / TensorRT export and benchmarking defaults."""

    SECTION: ClassVar[str] = "export"

    output_stride: int = 8
    dynamic: bool = True
    opset: Optional[int] = None
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8
    workspace_gb: float = 4.0
    min_shape: str = "1x3x257x257"
    opt_shape: str = "1x3x513x513"
    max_shape: str = "4x3x1025x1025"
    calib_images: int = 32
    max_int8_miou_drop: float = 1.0  # mIoU points INT8 may lose against FP32 (negative: it must gain)
    image_size: int = 513
    tolerance: float = 1e-3  # ONNX vs PyTorch: max |logit diff| / max(1, |largest logit|)
    accuracy_images: int = 16  # held-out images for --check-accuracy (FP32 vs INT8/FP16 mIoU)

    PRECISIONS: ClassVar[tuple] = PRECISIONS

    def check_values(self) -> None:
        self._need(self.output_stride in OUTPUT_STRIDES, "output_stride", "is not allowed; use one of 8, 16, 32")
        self._need(self.opset is None or self.opset >= 11, "opset", "must be >= 11 (or null: the exporter's default)")
        self._need_one_of("precision", PRECISIONS)
        for name in ("workspace_gb", "tolerance"):
            self._need(0 < getattr(self, name) < math.inf, name, "must be > 0")
        self._need_at_least(1, "calib_images", "image_size")
        self._need_at_least(0, "accuracy_images")  # 0: no accuracy check
        self.profile()

    @staticmethod
    def parse_shape(name: str, text: str) -> tuple:
        """'1x3x513x513' -> (1, 3, 513, 513); ConfigError naming export.<name> otherwise."""
        try:
            shape = tuple(int(p) for p in str(text).lower().replace(",", "x").split("x"))
        except ValueError:
            shape = ()
        if len(shape) != 4 or min(shape) < 1:
            _fail(f"export.{name}", text, "must be 4 positive sizes NxCxHxW, e.g. 1x3x513x513")
        if shape[1] != 3:
            _fail(f"export.{name}", text, f"has {shape[1]} channels; the model takes 3 (RGB)")
        return shape

    def profile(self) -> dict:
        """The TensorRT optimization profile {"min", "opt", "max"} as NCHW tuples, each dim min <= opt <= max."""
        shapes = {k: self.parse_shape(f"{k}_shape", getattr(self, f"{k}_shape")) for k in ("min", "opt", "max")}
        for i, dim in enumerate("NCHW"):
            lo, mid, hi = (shapes[k][i] for k in ("min", "opt", "max"))
            if not lo <= mid <= hi:
                raise ConfigError(f"export.min_shape/opt_shape/max_shape: {dim} must satisfy min <= opt <= max, "
                                  f"got {lo}, {mid}, {hi}",
                                  ("export.min_shape", "export.opt_shape", "export.max_shape"))
        return shapes


@dataclass
class SegmentConfig(_Section):
    """Batch inference over an image collection with Ray Data (python -m cluster.segment)."""

    SECTION: ClassVar[str] = "segment"

    workers: Optional[int] = None  # model actors (None: as many as the cluster's CPUs or GPUs hold)
    batch_size: int = 4  # images per actor call; split into same-size groups, never resized
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    cpus_per_decode: float = 0.5  # each read + decode task
    output_stride: Optional[int] = None  # checkpoints only (None: the checkpoint's); exported models are fixed
    color: bool = False  # also NAME_color.png and NAME_overlay.png
    alpha: float = 0.5  # overlay opacity
    max_pixels: Optional[int] = None  # larger images fail (None: Pillow's decompression-bomb limit)
    max_batch_pixels: int = 2048 * 2048  # pixels per model call (~0.6 KB each at OS8, R-101); a larger image runs alone
    progress_interval_s: float = 5.0

    def check_values(self) -> None:
        self._need_at_least(1, "workers", "batch_size", "max_pixels", "max_batch_pixels")
        for name in ("cpus_per_worker", "gpus_per_worker", "cpus_per_decode"):
            self._need(0 <= getattr(self, name) < math.inf, name, "must be >= 0")
        self._need(self.cpus_per_worker > 0 or self.gpus_per_worker > 0, "cpus_per_worker",
                   "must be > 0 unless segment.gpus_per_worker > 0")
        self._need(self.output_stride in (None, *OUTPUT_STRIDES), "output_stride",
                   "is not allowed; use one of 8, 16, 32 (or null: the checkpoint's)")
        self._need(0 <= self.alpha <= 1, "alpha", "must be between 0 and 1")
        self._need(0 < self.progress_interval_s < math.inf, "progress_interval_s", "must be > 0")


@dataclass
class ServeConfig(_Section):
    """An HTTP endpoint on Ray Serve (python -m cluster.serve)."""

    SECTION: ClassVar[str] = "serve"

    host: str = "127.0.0.1"  # loopback unless you say otherwise
    port: int = 8000
    replicas: int = 1
    autoscale: Optional[Tuple[int, int]] = None  # [min, max] replicas: Serve scales between them instead
    max_batch_size: int = 8  # concurrent requests run as one batch (1: no batching)
    batch_wait_ms: float = 10.0  # how long a batch waits to fill
    cpus_per_replica: float = 1
    gpus_per_replica: float = 0
    output_stride: Optional[int] = None  # checkpoints only
    max_pixels: int = 2048 * 2048  # larger uploads answer 413
    max_batch_pixels: int = 2048 * 2048  # pixels per model call (~0.6 KB each at OS8, R-101); an image over it: 413
    max_upload_mb: float = 32.0
    max_queued_requests: int = 32  # waiting at the proxy beyond each replica's batch slots; more: 503
    retry_after_s: float = 1.0  # the Retry-After header of a 503
    request_timeout_s: float = 60.0  # from the request's arrival at a replica to its answer; longer: 504
    read_timeout_s: float = 10.0  # to receive an upload's body; slower: 408 and the slot is freed
    stats_interval_s: float = 60.0  # the console's traffic line (requests, latency, batch size, errors)
    metrics_port: Optional[int] = None  # Prometheus /metrics of a local Ray instance (None: Ray picks one)

    def check_values(self) -> None:
        self._need(bool(self.host), "host", "must be an address to bind, e.g. 127.0.0.1")
        self._need(1 <= self.port <= 65535, "port", "must be 1-65535")
        self._need_at_least(1, "replicas", "max_batch_size", "max_pixels", "max_batch_pixels", "max_queued_requests")
        if self.autoscale is not None:
            low, high = self.autoscale
            self._need(0 <= low <= high and high >= 1, "autoscale",
                       "must be [MIN, MAX] replicas with 0 <= MIN <= MAX and MAX >= 1")
            if self.replicas != 1:
                raise ConfigError(f"serve.replicas={self.replicas} and serve.autoscale={_show(self.autoscale)}: "
                                  "set one (a fixed count, or MIN and MAX)", ("serve.replicas", "serve.autoscale"))
        for name in ("batch_wait_ms", "cpus_per_replica", "gpus_per_replica"):
            self._need(0 <= getattr(self, name) < math.inf, name, "must be >= 0")
        self._need(self.output_stride in (None, *OUTPUT_STRIDES), "output_stride",
                   "is not allowed; use one of 8, 16, 32 (or null: the checkpoint's)")
        for name in ("max_upload_mb", "request_timeout_s", "read_timeout_s", "stats_interval_s"):
            self._need(0 < getattr(self, name) < math.inf, name, "must be > 0")
        self._need(0 <= self.retry_after_s < math.inf, "retry_after_s", "must be >= 0")
        self._need(self.metrics_port is None or 1 <= self.metrics_port <= 65535, "metrics_port", "must be 1-65535")


# ---------------------------------------------------------------------------------------------------------
# What spans sections


def split_batch(global_batch: int, world_size: int, rank: int) -> int:
    """Rank's share of the global batch: every world_size-th image of it, so shares differ by one at most
    (8 over 3 workers: 3, 3, 2). Synchronized BatchNorm sees the global batch whatever the shares."""
    return len(range(rank, global_batch, world_size))


def per_worker_batch(batch_size: int, world_size: int, synchronized_bn: bool = False, frozen_bn: bool = False) -> int:
    """The smallest share of the global batch over ``world_size`` workers (they differ by one at most). Every
    worker needs an image; one image per worker is refused only where a BatchNorm layer in training mode would
    see one value per channel (the image-pooling branch after global pooling): one worker, or no synchronized
    BN. Synchronized BN over several workers normalizes over the global batch; frozen BN (eval mode) uses its
    running statistics."""
    keys = ("train.batch_size", "cluster.num_workers")
    per_worker = split_batch(batch_size, world_size, world_size - 1)
    if per_worker < 1:
        raise ConfigError(f"train.batch_size={batch_size} is the global batch: fewer images than the {world_size} "
                          "workers, and every worker needs one: raise train.batch_size or use fewer workers", keys)
    seen_by_bn = batch_size if synchronized_bn else per_worker
    if seen_by_bn < 2 and not frozen_bn:
        why = "one worker" if world_size == 1 else "BatchNorm not synchronized across the workers"
        raise ConfigError(f"train.batch_size={batch_size} over {world_size} worker(s) is {per_worker} image per "
                          f"worker and, with {why}, BatchNorm (the image-pooling branch) would see one value per "
                          "channel: raise train.batch_size, or freeze BN (train.freeze_bn)", keys)
    return per_worker


def bn_momentum_warning(train: TrainConfig) -> Optional[str]:
    """One line when BatchNorm's running statistics would still be mostly their initial values at the end of
    the run ((1 - bn_momentum) ** max_iterations > 0.5), naming a value that would work; else None."""
    momentum = 0.1 if train.bn_momentum is None else train.bn_momentum
    kept = (1 - momentum) ** train.max_iterations
    if train.freeze_bn or kept <= 0.5:
        return None
    needed = 1 - 0.5 ** (1 / train.max_iterations)
    scale = 10 ** math.floor(math.log10(needed))
    suggest = min(1.0, math.ceil(needed / scale) * scale)
    return (f"train.bn_momentum={momentum:g} leaves {kept:.0%} of BatchNorm's initial running statistics after "
            f"{train.max_iterations} iterations, so evaluation would normalize with them: set train.bn_momentum "
            f">= {suggest:.1g} for a run this short (the paper's 0.0003 suits 30000 iterations)")


def evaluations_per_run(train: TrainConfig, cap: Optional[int] = None) -> int:
    """How many times a run reports val mIoU: every eval_interval iterations and at the end."""
    iterations = min(train.max_iterations, cap or train.max_iterations)
    return math.ceil(iterations / train.eval_interval)


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

    def __post_init__(self):
        self.check_across()

    def check(self) -> "ExperimentConfig":
        """Check every section again, then what spans them: for code that changes fields after building."""
        for name in SECTIONS:
            getattr(self, name).check()
        self.check_across()
        return self

    def check_across(self) -> None:
        t, c, tune = self.train, self.cluster, self.tune
        for workers in range(c.min_workers, c.max_workers + 1):  # every size an elastic group can have
            per_worker_batch(t.batch_size, workers, synchronized_bn=workers > 1, frozen_bn=t.freeze_bn)
        if t.amp == "fp16" and not c.use_gpu:
            raise ConfigError("train.amp='fp16' needs GPUs (cluster.use_gpu, --use-gpu); use bf16, auto or off "
                              "on CPU workers", ("train.amp", "cluster.use_gpu"))
        evaluations = evaluations_per_run(t, tune.max_iterations)
        if tune.scheduler == "asha" and tune.grace_period > evaluations:
            iterations = min(t.max_iterations, tune.max_iterations or t.max_iterations)
            raise ConfigError(f"tune.grace_period={tune.grace_period} is more than the {evaluations} evaluation(s) "
                              f"per trial ({iterations} iterations, train.eval_interval {t.eval_interval}): lower "
                              f"tune.grace_period to <= {evaluations} or run more iterations per trial",
                              ("tune.grace_period", "tune.max_iterations", "train.max_iterations",
                               "train.eval_interval"))

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


# ---------------------------------------------------------------------------------------------------------
# Building a config from plain values, naming where a mistake came from


def _build(cls, values: dict, section: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{section}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)


def _located(error: ConfigError, where: Optional[str], sources: Optional[dict] = None) -> ConfigError:
    """The error prefixed with what the user wrote it in: the --set items or flags that set its fields,
    else the file (``where``)."""
    labels = []
    for key in error.fields:
        labels += [label for label in (sources or {}).get(key, []) if label not in labels]
    prefix = ", ".join(labels) or where
    return ConfigError(f"{prefix}: {error}" if prefix else str(error), error.fields)


def model_config_from_dict(values: dict) -> ModelConfig:
    return _build(ModelConfig, values, "model")


def experiment_from_dict(values: dict, where: Optional[str] = "config", sources: Optional[dict] = None
                         ) -> ExperimentConfig:
    """An ExperimentConfig from plain values (YAML, a checkpoint); a ConfigError names ``where`` (or the
    ``--set`` items in ``sources``: SECTION.FIELD -> labels) and the field."""
    values = values or {}
    try:
        unknown = sorted(set(values) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
        return ExperimentConfig(**{name: _build(cls, values.get(name), name) for name, cls in SECTION_CLASSES.items()})
    except ConfigError as e:
        raise _located(e, where, sources) from None


def _parse_value(text: str):
    """A command-line value as YAML would read it: 8 -> int, [6,12,18] -> list, null -> None."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _apply(values: dict, overrides) -> dict:
    """Apply ``SECTION.FIELD=VALUE`` items (or ``(item, label)`` pairs, label naming the flag the user typed)
    to a plain config dict in place; returns SECTION.FIELD -> [labels] for error messages."""
    sources: dict = {}
    for entry in overrides or []:
        item, label = entry if isinstance(entry, tuple) else (entry, f"--set {entry}")
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in SECTIONS:
            raise ConfigError(f"{label}: expected SECTION.FIELD=VALUE with SECTION one of {', '.join(SECTIONS)}")
        known = [f.name for f in fields(SECTION_CLASSES[section])]
        if name not in known:
            raise ConfigError(f"{label}: {section} has no field {name!r}; known: {', '.join(sorted(known))}")
        if values.get(section) is None:
            values[section] = {}
        values[section][name] = _parse_value(raw)
        sources.setdefault(f"{section}.{name}", []).append(label)
    return sources


def apply_overrides(values: dict, overrides: list) -> dict:
    """Apply ``section.field=value`` strings to a plain config dict (in place) and return it."""
    _apply(values, overrides)
    return values


PATH_FIELDS = {"train.init_from": "file", "train.pretrained_backbone": "file", "data.root": "folder"}


def _is_torch_file(path: Path) -> bool:
    """What torch.save writes: a zip archive (torch >= 1.6) or a pickle (protocol 2+ starts with 0x80)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _path_problem(cfg: ExperimentConfig, key: str) -> Optional[str]:
    """Why a path field's file or folder cannot be used on this machine, or None."""
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if not value or "://" in value or (key == "data.root" and cfg.data.dataset == "synthetic"):
        return None  # unset, remote (s3://, gs://: the workers read it), or not needed
    path = Path(value).expanduser()
    if PATH_FIELDS[key] == "folder":
        return None if path.is_dir() else "dataset folder not found"
    if not path.is_file():
        return "is a folder, not a weights file" if path.is_dir() else "no such file"
    return None if _is_torch_file(path) else "is not a PyTorch weights file (torch.save / .pth / .ckpt)"


def _check_paths(cfg: ExperimentConfig, keys, where: Optional[str], sources: dict) -> None:
    for key in keys:
        problem = _path_problem(cfg, key)
        if problem:
            section, name = key.split(".")
            error = ConfigError(f"{key}={getattr(getattr(cfg, section), name)}: {problem}", (key,))
            raise _located(error, where, sources)


def _experiment(values: dict, where: Optional[str], overrides, all_paths: bool) -> ExperimentConfig:
    """Values + overrides -> a checked ExperimentConfig; paths checked where the user gave them (every path
    field for a file the user named, only overridden ones on top of a checkpoint's experiment)."""
    sources = _apply(values, overrides)
    cfg = experiment_from_dict(values, where, sources)
    _check_paths(cfg, PATH_FIELDS if all_paths else [k for k in PATH_FIELDS if k in sources], where, sources)
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> ExperimentConfig:
    """Read a YAML experiment file (None: the embedded defaults) and apply ``--set`` overrides; the paths it
    names must exist."""
    values: dict = {}
    where = None
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
    return _experiment(values, where, overrides, all_paths=True)


def save_config(cfg: ExperimentConfig, path) -> None:
    """Write a config as YAML atomically."""
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------------------
# Command lines: --config, --set and shorthand flags, one override path


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
    choices: Optional[tuple] = None  # the words argparse accepts (the field's check still applies)

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

    def label(self, value) -> str:
        """The flag as the user typed it, for error messages."""
        if self.switch:
            return self.flag
        return f"{self.flag} {' '.join(value) if isinstance(value, list) else value}"


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
            parser.add_argument(alias.flag, nargs=alias.nargs, default=None, metavar=alias.metavar,
                                choices=alias.choices, help=text)
    parser.set_defaults(_config_aliases=tuple(aliases))


def _labelled_overrides(args: argparse.Namespace) -> list:
    """(SECTION.FIELD=VALUE, what the user typed) for ``--set`` items, then the shorthand flags given."""
    items = [(item, f"--set {item}") for item in getattr(args, "overrides", None) or []]
    for alias in getattr(args, "_config_aliases", ()):
        value = getattr(args, alias.flag.lstrip("-").replace("-", "_"), None)
        item = alias.override(value)
        if item is not None:
            items.append((item, alias.label(value)))
    return items


def config_overrides(args: argparse.Namespace) -> list:
    """``--set`` items followed by the shorthand flags given, all as SECTION.FIELD=VALUE (later ones win)."""
    return [item for item, _ in _labelled_overrides(args)]


def config_from_args(args: argparse.Namespace, base: Optional[ExperimentConfig] = None,
                     extra: tuple = ()) -> ExperimentConfig:
    """The experiment a command runs: ``--config`` (else ``base``, e.g. a checkpoint's own experiment, else the
    defaults), then ``--set`` and the shorthand flags, through one override path. ``extra``: further
    ``(SECTION.FIELD=VALUE, label)`` items a command derives from its own flags, applied last."""
    overrides = _labelled_overrides(args) + list(extra)
    if getattr(args, "config", None) or base is None:
        return load_config(getattr(args, "config", None), overrides)
    return _experiment(base.to_dict(), "checkpoint config", overrides, all_paths=False)
