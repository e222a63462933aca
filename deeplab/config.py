"""One config system for every entry point: dataclasses loaded from YAML, overridden on the command line.

An experiment file has one mapping per section; each maps onto one registered dataclass. deeplab declares
``model``, ``data``, ``train`` and ``inference`` below; the packages above it declare theirs next to their code
and register them on import (`register_section`), so this file knows none of them. A section whose package
is not imported in this process is kept as written and saved back whole. ``--set section.field=value``
overrides any field of a registered section from any command.

A config that builds is valid: each section checks its own fields when it is built (types first, then
values), and the checks registered across sections run on the whole experiment. So every mistake a config
can hold is answered on the driver, in one line naming the field, the value and what is allowed, before Ray
starts. A ConfigError from a file names the file; one from ``--set`` (or a shorthand flag) names that item.
Paths that must exist are checked only when a command builds its config from the command line
(`load_config`, `config_from_args`): a checkpoint's own experiment must still load on a machine that lacks
its training paths.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

from .backbones import backbone_names, backbone_spec
from .cli import UserError
from .data.formats import DATASETS
from .fileio import write_text_atomic

MODEL_STRIDES = (4, 8, 16, 32, 64, 128, 256)  # the paper's Table 1; 64-256 carried by cascaded blocks 5-7
STRIDES_ALLOWED = "use one of 4, 8, 16, 32 (64, 128, 256 with cascaded blocks)"
PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the paper's multi-scale inference (Section 4.1)
HEADS = ("paper", "torchvision")
# Where atrous rates go once strides are removed (deeplab.model.block_layout): "exact" (the OS16 <-> OS8 switch is
# an exact densification), "torchvision" (its _make_layer), "legacy" (checkpoints written before it was recorded).
ATROUS_LAYOUTS = ("exact", "torchvision", "legacy")
SYNTHETIC_MAX_CLASSES = 12  # background + the 11 shapes of deeplab.data.synthetic
AMP_MODES = ("auto", "bf16", "fp16", "off")


class ConfigError(UserError, ValueError):
    """A config value a user wrote is not allowed; the message names the field and what is allowed.
    ``fields``: the SECTION.FIELD keys at fault, so the error can name the file or --set item they came from."""

    def __init__(self, message: str = "", fields: tuple = ()):
        super().__init__(message)
        self.fields = tuple(fields)


# ---------------------------------------------------------------------------------------------------------
# Checking one value: its type, then its range


def show_value(value) -> str:
    """A value as a user wrote it: strings quoted (so 'fast' reads as text), lists in brackets, YAML words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def fail_value(key: str, value, what: str):
    raise ConfigError(f"{key}={show_value(value)} {what}", (key,))


def _describe(hint) -> str:
    """The type a field expects, in words for an error message."""
    args = get_args(hint)
    if get_origin(hint) is Union:
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if get_origin(hint) is tuple:
        kind = "numbers" if args[0] is float else "integers"
        return f"a list of {kind}" if args[-1] is Ellipsis else f"a list of {len(args)} {kind}"
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


class Section:
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
                fail_value(self._key(f.name), value, f"must be {_describe(hints[f.name])}")
            setattr(self, f.name, converted)
        self.check_values()

    def check_values(self) -> None:
        """The section's own ranges and allowed words (its fields already have their types)."""

    def _key(self, name: str) -> str:
        return f"{self.SECTION}.{name}"

    def _need(self, ok: bool, name: str, what: str) -> None:
        if not ok:
            fail_value(self._key(name), getattr(self, name), what)

    def _need_at_least(self, low, *names) -> None:
        for name in names:
            value = getattr(self, name)
            self._need(value is None or value >= low, name, f"must be >= {low}")

    def _need_output_stride(self, name: str, none_means: str = "") -> None:
        """The one check of an output stride field: what the model can run at (cascaded blocks carry 64-256;
        a model refuses a stride it cannot reach when switched to it)."""
        allowed = f"{STRIDES_ALLOWED[:-1]}; {none_means})" if none_means else STRIDES_ALLOWED
        value = getattr(self, name)
        self._need((value is None and bool(none_means)) or value in MODEL_STRIDES, name, f"is not allowed; {allowed}")

    def _need_one_of(self, name: str, allowed) -> None:
        self._need(getattr(self, name) in allowed, name, f"is unknown; allowed: {', '.join(map(str, allowed))}")


# ---------------------------------------------------------------------------------------------------------
# The sections


@dataclass
class ModelConfig(Section):
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
        self._need_output_stride("output_stride")
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
        raise ConfigError(f"{self._key('aspp_rates')}={show_value(self.aspp_rates)} {what}, e.g. "
                          f"{show_value(working)}, or "
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
class DataConfig(Section):
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
class TrainConfig(Section):
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
class InferenceConfig(Section):
    """How every command that predicts or evaluates runs a model, in whichever package: their --output-stride,
    --scales, --multi-scale, --flip, --window and --alpha flags set these fields, so each is checked here once."""

    SECTION: ClassVar[str] = "inference"

    output_stride: Optional[int] = None  # null: the model's own (a checkpoint's; an exported file's is fixed)
    scales: Tuple[float, ...] = (1.0,)  # input scales whose softmax probabilities are averaged
    flip: bool = False  # also average left-right flipped inputs
    window: Optional[int] = None  # sliding windows of PX x PX (1/3 overlap) for larger inputs; null: whole images
    alpha: float = 0.5  # overlay opacity of the class colours

    def check_values(self) -> None:
        self._need_output_stride("output_stride", "or null: the model's own")
        self._need(len(self.scales) >= 1 and min(self.scales) > 0, "scales",
                   "must be one or more scales > 0, e.g. [0.5, 0.75, 1.0]")
        self._need(self.window is None or self.window >= 16, "window",
                   "must be at least 16 pixels (or null: whole images)")
        self._need(0 <= self.alpha <= 1, "alpha", "must be between 0 and 1")

    def options(self) -> dict:
        """The keyword arguments of deeplab.inference.model_predictor."""
        return {"output_stride": self.output_stride, "scales": self.scales, "flip": self.flip, "window": self.window}


# ---------------------------------------------------------------------------------------------------------
# What spans sections


def split_batch(global_batch: int, world_size: int, rank: int) -> int:
    """Rank's share of the global batch: every world_size-th image of it, so shares differ by one at most
    (8 over 3 workers: 3, 3, 2). Synchronized BatchNorm sees the global batch whatever the shares."""
    return len(range(rank, global_batch, world_size))


def per_worker_batch(batch_size: int, world_size: int, synchronized_bn: bool = False, frozen_bn: bool = False,
                     workers_key: Optional[str] = None) -> int:
    """The smallest share of the global batch over ``world_size`` workers (they differ by one at most). Every
    worker needs an image; one image per worker is refused only where a BatchNorm layer in training mode would
    see one value per channel (the image-pooling branch after global pooling): one worker, or no synchronized
    BN. Synchronized BN over several workers normalizes over the global batch; frozen BN (eval mode) uses its
    running statistics. ``workers_key``: the field that set the worker count, named in the error too."""
    keys = ("train.batch_size",) + ((workers_key,) if workers_key else ())
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


# ---------------------------------------------------------------------------------------------------------
# The experiment: every registered section. deeplab registers its own below; each package above it registers
# its sections when it is imported, so this file names none of them.

SECTION_CLASSES: dict = {}  # section name -> its dataclass, in the order registered
_CHECKS: list = []  # functions(ExperimentConfig) checking what spans sections, registered with a section


def register_section(cls, check_across: Optional[Callable] = None):
    """Make ``cls`` (a section dataclass with ``SECTION``) a section of every experiment from now on;
    ``check_across(cfg)`` checks what spans it and other sections. Idempotent (a module imported twice)."""
    name = cls.SECTION
    known = SECTION_CLASSES.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"config section {name!r} is already {known.__module__}.{known.__qualname__}")
    SECTION_CLASSES[name] = cls
    if check_across is not None:
        _CHECKS[:] = [c for c in _CHECKS if c.__qualname__ != check_across.__qualname__] + [check_across]
    return cls


class ExperimentConfig:
    """One experiment: an attribute per registered section (``cfg.model``, ``cfg.train``, ...). A section read
    from a file or checkpoint whose package is not imported here is kept as written (``raw``): saved back
    whole, and checked when its package registers it and the code asks for it."""

    def __init__(self, _raw: Optional[dict] = None, **sections):
        unknown = sorted(set(sections) - set(SECTION_CLASSES))
        if unknown:
            raise TypeError(f"ExperimentConfig: no section(s) {', '.join(unknown)}")
        self._raw = dict(_raw or {})
        for name, cls in SECTION_CLASSES.items():
            setattr(self, name, sections[name] if sections.get(name) is not None else cls())
        self.check_across()

    def __getattr__(self, name: str):
        """A section registered after this config was built: built now from what was read (fields it gave up
        to another section dropped: that one is built already), or its defaults; then checked across sections."""
        if name.startswith("_") or name not in SECTION_CLASSES:
            raise AttributeError(f"ExperimentConfig has no section {name!r} (its package registers it on import)")
        cls, values = SECTION_CLASSES[name], self._raw.pop(name, None)
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if k not in getattr(cls, "MOVED", {})}
        setattr(self, name, _build(cls, values, name))
        self.check_across()
        return getattr(self, name)

    def replace(self, **sections) -> "ExperimentConfig":
        """A copy with some sections replaced (checked across sections again)."""
        return ExperimentConfig(self._raw, **{**self.sections(), **sections})

    def sections(self) -> dict:
        """Every registered section by name."""
        return {name: getattr(self, name) for name in SECTION_CLASSES}

    def check(self) -> "ExperimentConfig":
        """Check every section again, then what spans them: for code that changes fields after building."""
        for section in self.sections().values():
            section.check()
        self.check_across()
        return self

    def check_across(self) -> None:
        for check in _CHECKS:
            check(self)

    def to_dict(self) -> dict:
        """Every section as plain values, the ones kept as written included."""
        return {**{name: to_plain(s) for name, s in self.sections().items()}, **copy.deepcopy(self._raw)}

    def __eq__(self, other) -> bool:
        return isinstance(other, ExperimentConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"ExperimentConfig({', '.join(f'{k}={v!r}' for k, v in self.sections().items())})"


for _cls in (ModelConfig, DataConfig, TrainConfig, InferenceConfig):
    register_section(_cls)
OWN_SECTIONS = tuple(SECTION_CLASSES)  # what deeplab declares: model, data, train, inference; the rest come from above


def to_plain(obj: Any) -> Any:
    """Dataclasses and experiments -> dicts, tuples -> lists: what YAML and weights_only checkpoints can hold."""
    if isinstance(obj, ExperimentConfig):
        return obj.to_dict()
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


def _moved_fields(values: dict) -> None:
    """Fields a section gave up to another (a class's ``MOVED``: old name -> SECTION.FIELD, e.g. an output
    stride -> inference.output_stride), moved in place so files written before the move still load. A moved
    value never overrides one written at its new place; null (the old default) is dropped."""
    for name, cls in SECTION_CLASSES.items():
        section = values.get(name)
        for old, new in getattr(cls, "MOVED", {}).items():
            if not isinstance(section, dict) or old not in section:
                continue
            value = section.pop(old)
            target, field_name = new.split(".")
            target_values = values.get(target) or {}
            if value is not None and isinstance(target_values, dict):
                target_values.setdefault(field_name, value)
                values[target] = target_values


def _raw_sections(values: dict) -> dict:
    """The sections no imported package registered, kept as written; a near-miss of a registered name is a
    typo, answered now."""
    raw = {}
    for name in sorted(set(values) - set(SECTION_CLASSES)):
        close = difflib.get_close_matches(str(name), list(SECTION_CLASSES), n=1, cutoff=0.75)
        if close or not isinstance(values[name], (dict, type(None))) or not str(name).isidentifier():
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"unknown section(s) {name}; {hint}known: {', '.join(SECTION_CLASSES)}")
        raw[name] = copy.deepcopy(values[name])
    return raw


def experiment_from_dict(values: dict, where: Optional[str] = "config", sources: Optional[dict] = None
                         ) -> ExperimentConfig:
    """An ExperimentConfig from plain values (YAML, a checkpoint); a ConfigError names ``where`` (or the
    ``--set`` items in ``sources``: SECTION.FIELD -> labels) and the field."""
    values = copy.deepcopy(values or {})
    try:
        _moved_fields(values)
        raw = _raw_sections(values)
        built = {name: _build(cls, values.get(name), name) for name, cls in SECTION_CLASSES.items()}
        return ExperimentConfig(raw, **built)
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
        if not sep or not dot or section not in SECTION_CLASSES:
            raise ConfigError(f"{label}: expected SECTION.FIELD=VALUE with SECTION one of "
                              f"{', '.join(SECTION_CLASSES)} (the sections this command knows)")
        known = [f.name for f in fields(SECTION_CLASSES[section])]
        if name not in known:
            raise ConfigError(f"{label}: {section} has no field {name!r}; known: {', '.join(sorted(known))}")
        if values.get(section) is None:
            values[section] = {}
        values[section][name] = _parse_value(raw)
        sources.setdefault(f"{section}.{name}", []).append(label)
    return sources


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
    """A shorthand flag for one config field: ``--output-stride 8`` means ``--set inference.output_stride=8``.

    The value goes through the same override path as ``--set`` (parsed as YAML, checked by the section's
    dataclass), so a flag and its field can never disagree. ``switch``: a flag without a value that sets the
    field to ``value`` (true unless given, e.g. --multi-scale: the paper's scales); ``nargs="+"``: several
    values become a YAML list.
    """

    flag: str
    key: str  # SECTION.FIELD
    help: str = ""
    nargs: Optional[str] = None
    switch: bool = False
    metavar: Optional[str] = None
    choices: Optional[tuple] = None  # the words argparse accepts (the field's check still applies)
    value: str = "true"  # what a switch sets, as YAML
    default_note: Optional[str] = None  # --help's words for the default, where the field's own would mislead

    def default(self):
        section, name = self.key.split(".", 1)
        return _default(SECTION_CLASSES[section], name)

    def override(self, value) -> Optional[str]:
        """The ``SECTION.FIELD=VALUE`` text for a parsed command-line value (None: flag not given)."""
        if value is None:
            return None
        if self.switch:
            return f"{self.key}={self.value}"
        if isinstance(value, list):
            return f"{self.key}=[{', '.join(value)}]"
        return f"{self.key}={value}"

    def label(self, value) -> str:
        """The flag as the user typed it, for error messages."""
        if self.switch:
            return self.flag
        return f"{self.flag} {' '.join(value) if isinstance(value, list) else value}"


# The inference section's flags, shared by every command that predicts or evaluates (the section checks them).
INFERENCE_ALIASES = [
    Alias("--output-stride", "inference.output_stride",
          "run at this output stride (default: the model's own; the paper evaluates at 8)"),
    Alias("--scales", "inference.scales", "input scales whose softmax probabilities are averaged",
          nargs="+", metavar="S"),
    Alias("--multi-scale", "inference.scales", f"the paper's scales {', '.join(map(str, PAPER_SCALES))}",
          switch=True, value=show_value(PAPER_SCALES)),
    Alias("--flip", "inference.flip", "also average left-right flipped inputs", switch=True),
    Alias("--window", "inference.window", "sliding windows of PX x PX (1/3 overlap) for inputs larger than that",
          metavar="PX"),
]
ALPHA_ALIAS = Alias("--alpha", "inference.alpha", "overlay opacity of the class colours (0-1)")


def add_config_args(parser: argparse.ArgumentParser, required: bool = False, aliases=()) -> None:
    """The config flags every command shares: --config FILE, repeated --set SECTION.FIELD=VALUE, and the
    command's shorthand ``aliases`` (each one config field; --help shows the field and its default)."""
    parser.add_argument("--config", required=required,
                        help=f"experiment YAML (sections {'/'.join(SECTION_CLASSES)})" + ("" if required else
                             "; default: a model file's own experiment where the command reads one, else the "
                             "built-in defaults"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field, e.g. --set model.output_stride=8 (repeatable; none by "
                             "default)")
    for alias in aliases:
        section, name = alias.key.split(".", 1)
        if section not in SECTION_CLASSES or name not in {f.name for f in fields(SECTION_CLASSES[section])}:
            raise ValueError(f"alias {alias.flag}: {alias.key} is not a config field")
        text = f"{alias.help} ({alias.key}; {alias.default_note or f'config default: {alias.default()}'})".lstrip()
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


def config_from_args(args: argparse.Namespace, base: Optional[ExperimentConfig] = None,
                     extra: tuple = ()) -> ExperimentConfig:
    """The experiment a command runs: ``--config`` (else ``base``, e.g. a checkpoint's own experiment, else the
    defaults), then ``--set`` and the shorthand flags, through one override path. ``extra``: further
    ``(SECTION.FIELD=VALUE, label)`` items a command derives from its own flags, applied last."""
    overrides = _labelled_overrides(args) + list(extra)
    if getattr(args, "config", None) or base is None:
        return load_config(getattr(args, "config", None), overrides)
    return _experiment(base.to_dict(), "checkpoint config", overrides, all_paths=False)
