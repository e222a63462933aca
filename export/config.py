"""export's config section (``export``): ONNX / TensorRT export and benchmarking defaults. Registered with
deeplab's config on import (the package's __init__ imports this)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

from deeplab.config import ConfigError, Section, fail_value, register_section

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass
class ExportConfig(Section):
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
        self._need_output_stride("output_stride")
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
            fail_value(f"export.{name}", text, "must be 4 positive sizes NxCxHxW, e.g. 1x3x513x513")
        if shape[1] != 3:
            fail_value(f"export.{name}", text, f"has {shape[1]} channels; the model takes 3 (RGB)")
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


register_section(ExportConfig)
