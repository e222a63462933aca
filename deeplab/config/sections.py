"""deeplab's config sections: ``Section``, the base every section dataclass (here and in the packages above)
derives from, and the ``model``, ``data``, ``train`` and ``inference`` sections with the constants they check.

A section checks its own fields when it is built (types first, then values), knowing nothing of the registry
or of other sections: what spans sections is checked by the experiment (deeplab.config.experiment).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import ClassVar, Optional, Tuple, Union, get_type_hints

from ..backbones import backbone_names, backbone_spec
from ..data.formats import DATASETS
from .values import ConfigError, convert_value, describe_type, fail_value, show_value

MODEL_STRIDES = (4, 8, 16, 32, 64, 128, 256)  # the paper's Table 1; 64-256 carried by cascaded blocks 5-7
STRIDES_ALLOWED = "use one of 4, 8, 16, 32 (64, 128, 256 with cascaded blocks)"
PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the paper's multi-scale inference (Section 4.1)
HEADS = ("paper", "torchvision")
# Where atrous rates go once strides are removed (deeplab.model.block_layout): "exact" (the OS16 <-> OS8 switch is
# an exact densification), "torchvision" (its _make_layer), "legacy" (checkpoints written before it was recorded).
ATROUS_LAYOUTS = ("exact", "torchvision", "legacy")
SYNTHETIC_MAX_CLASSES = 12  # background + the 11 shapes of deeplab.data.synthetic
AMP_MODES = ("auto", "bf16", "fp16", "off")


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
            ok, converted = convert_value(value, hints[f.name])
            if not ok:
                fail_value(self._key(f.name), value, f"must be {describe_type(hints[f.name])}")
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

