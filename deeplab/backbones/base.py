"""The backbone contract, written once.

A backbone is an ``nn.Module`` built from the ModelConfig; ``forward(images)`` returns a dict of tensors whose
``out`` (``out_channels`` channels, at ``cfg.output_stride``) feeds the head. It also says:

- ``layout(cfg, output_stride)``: per stage, ``(stride, [atrous rate of each unit])``: a pure function, so the
  atrous rules are testable without building anything; ``set_output_stride(cfg)`` applies it in place (same
  weights);
- ``densifies(cfg, coarse, fine)``: whether that switch is an exact densification;
- ``init_weights(zero_init_last)``: its part of the from-scratch start, after the model's He/identity init;
- ``from_torchvision(state)``: torchvision's ImageNet classifier keys -> this module's keys, and
  ``matches_torchvision(keys, name)``: whether a file's backbone keys are ``name``'s;
- ``feature_size(crop, output_stride)``: the side of ``out`` for a crop.
"""
from __future__ import annotations

from typing import Optional

from torch import nn


def stage_layout(cfg, output_stride: int, stem_stride: int, stages, grid_from: int,
                 grid_in_torchvision: bool = False) -> list:
    """Per stage ``(stride, rates)`` for a backbone whose stage 0 keeps the stem's stride ``stem_stride`` and
    every later stage halves it, until ``output_stride`` is reached: then a stage keeps stride 1 and the rate
    doubles (Section 3.1). Where the doubled rate starts is ``cfg.atrous_layout`` (see
    `deeplab.backbones.resnet.block_layout`); stages from ``grid_from`` on follow Multi-Grid (block rate x
    unit rate), also under the torchvision layout when ``grid_in_torchvision``."""
    layout = []
    current, rate = stem_stride, 1
    for index, n_units in enumerate(stages):
        input_rate = rate
        if index > 0 and current >= output_stride:
            stride, rate = 1, rate * 2
        else:
            stride = 1 if index == 0 else 2
            current *= stride
        if index >= grid_from and (cfg.atrous_layout != "torchvision" or grid_in_torchvision):
            rates = [rate * cfg.multi_grid[u % 3] for u in range(n_units)]
        elif cfg.atrous_layout == "legacy":
            rates = [rate] * n_units
        else:
            rates = [input_rate] + [rate] * (n_units - 1)
        layout.append((stride, rates))
    return layout


def layouts_densify(coarse_layout: list, fine_layout: list, factor: int) -> bool:
    """Whether ``fine_layout`` computes ``coarse_layout``'s features at every position: each unit must use
    ``d`` times the coarse rate where its input is ``d`` times denser."""
    d = 1
    for (s_coarse, r_coarse), (s_fine, r_fine) in zip(coarse_layout, fine_layout):
        for u, (a, b) in enumerate(zip(r_coarse, r_fine)):
            if b != d * a:
                return False
            if u == 0:
                d = d * s_coarse // s_fine
    return d == factor


class Backbone(nn.Module):
    """Base of every backbone; subclasses set ``out_channels`` and implement ``layout`` and ``configure``."""

    out_channels: int
    torchvision_keys = "torchvision keys"  # what an ImageNet file holds, for the error when it holds none

    @classmethod
    def layout(cls, cfg, output_stride: Optional[int] = None) -> list:
        raise NotImplementedError

    @classmethod
    def densifies(cls, cfg, coarse: int, fine: int) -> bool:
        return layouts_densify(cls.layout(cfg, coarse), cls.layout(cfg, fine), coarse // fine)

    @staticmethod
    def feature_size(crop: int, output_stride: int) -> int:
        """Every stride-2 layer with 'same' padding (odd kernel, padding k // 2) maps n to (n - 1) // 2 + 1."""
        n = int(crop)
        for _ in range(output_stride.bit_length() - 1):
            n = (n - 1) // 2 + 1
        return n

    def configure(self, layout: list) -> None:
        """Set every stage's stride and rates in place from ``layout``."""
        raise NotImplementedError

    def set_output_stride(self, cfg) -> None:
        self.configure(self.layout(cfg))

    def init_weights(self, zero_init_last: bool) -> None:
        """Called after the model's He init for convolutions and identity norms; nothing more by default."""

    @staticmethod
    def from_torchvision(state: dict) -> dict:
        """torchvision's ImageNet classifier keys -> this backbone's (the classifier's keys stay unmatched)."""
        return state

    @staticmethod
    def matches_torchvision(keys, name: str) -> bool:
        """Whether backbone keys (after `from_torchvision`) are this backbone's ``name``: import's detection."""
        return False
