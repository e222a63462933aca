"""DeepLabv3 (Chen et al., 2017): a backbone with atrous convolution (ResNet with Multi-Grid and cascaded
blocks, or MobileNetV3; `deeplab.backbones`), then ASPP.

State-dict keys match torchvision's backbones (``backbone.conv1``, ``backbone.layer4.0.conv2``, ...) and, with
``head="torchvision"``, torchvision's DeepLabV3 (``classifier.0.convs.*``), so published weights load.

The contract between parts: the backbone returns a dict of tensors (``out``: the last stage); the head maps
``out`` to logits; the model upsamples logits to the input size.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import backbone_class
from .config import ModelConfig


def block_layout(cfg: ModelConfig, output_stride: Optional[int] = None) -> list:
    """The backbone's ``(stride, [rates])`` per stage at an output stride
    (e.g. `deeplab.backbones.resnet.block_layout`)."""
    return backbone_class(cfg.backbone).layout(cfg, output_stride)


def densifies(cfg: ModelConfig, coarse: int, fine: int) -> bool:
    """Whether switching ``coarse`` -> ``fine`` on the same weights computes the coarse features at every position."""
    return backbone_class(cfg.backbone).densifies(cfg, coarse, fine)


# ---------------------------------------------------------------------------------------------------------
# Heads


class ASPPPooling(nn.Sequential):
    """Image-level features (Section 3.3): global average pool, 1x1 conv + BN + ReLU, bilinear upsample."""

    def __init__(self, in_channels: int, channels: int, align_corners: bool = False):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.align_corners = align_corners

    def forward(self, x):
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)


def _conv_bn_relu(in_channels: int, channels: int, kernel: int, rate: int = 1) -> nn.Sequential:
    padding = rate if kernel == 3 else 0
    return nn.Sequential(nn.Conv2d(in_channels, channels, kernel, padding=padding, dilation=rate, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling: a 1x1 conv, one 3x3 atrous conv per rate, optional image pooling,
    concatenated and projected by a 1x1 conv, all with 256 filters and BatchNorm."""

    def __init__(self, in_channels: int, rates, channels: int = 256, image_pooling: bool = True,
                 dropout: float = 0.0, align_corners: bool = False):
        super().__init__()
        branches = [_conv_bn_relu(in_channels, channels, 1)]
        branches += [_conv_bn_relu(in_channels, channels, 3, r) for r in rates]
        if image_pooling:
            branches.append(ASPPPooling(in_channels, channels, align_corners))
        self.convs = nn.ModuleList(branches)
        project = [nn.Conv2d(channels * len(branches), channels, 1, bias=False), nn.BatchNorm2d(channels),
                   nn.ReLU(inplace=True)]
        if dropout:
            project.append(nn.Dropout(dropout))
        self.project = nn.Sequential(*project)

    def set_rates(self, rates) -> None:
        for branch, r in zip(self.convs[1:1 + len(rates)], rates):
            branch[0].dilation = (r, r)
            branch[0].padding = (r, r)

    def forward(self, x):
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


def _head(cfg: ModelConfig, in_channels: int) -> nn.Sequential:
    rates = cfg.rates_at()
    ch = cfg.aspp_channels
    if not cfg.aspp:  # Tables 1-3: the cascaded blocks alone, logits by a 1x1 conv on the last block
        return nn.Sequential(nn.Conv2d(in_channels, cfg.num_classes, 1))
    if cfg.head == "paper":  # ASPP, then the final 1x1 conv that gives the logits
        return nn.Sequential(ASPP(in_channels, rates, ch, cfg.image_pooling, align_corners=cfg.align_corners),
                             nn.Conv2d(ch, cfg.num_classes, 1))
    # torchvision's DeepLabHead: dropout in the projection and an extra 3x3 conv + BN + ReLU before the logits
    return nn.Sequential(ASPP(in_channels, rates, ch, cfg.image_pooling, dropout=0.5,
                              align_corners=cfg.align_corners),
                         nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
                         nn.Conv2d(ch, cfg.num_classes, 1))


# ---------------------------------------------------------------------------------------------------------
# The model


class DeepLabV3(nn.Module):
    """``forward(images)`` returns logits (N, num_classes, H, W) at the input size."""

    def __init__(self, cfg: ModelConfig, zero_init_last: bool = True):
        super().__init__()
        self.config = cfg
        self.bn_frozen = False
        self.backbone = backbone_class(cfg.backbone)(cfg)
        self.classifier = _head(cfg, self.backbone.out_channels)
        _init_weights(self, zero_init_last)

    @property
    def output_stride(self) -> int:
        return self.config.output_stride

    def set_output_stride(self, output_stride: int) -> "DeepLabV3":
        """Switch stride in place with the same weights (train at 16, infer at 8: Tables 4 and 6); which
        switches are exact densifications is said by the backbone's ``densifies``."""
        cfg = ModelConfig(**{**self.config.__dict__, "output_stride": output_stride})  # validates
        self.backbone.set_output_stride(cfg)
        if cfg.aspp:
            self.classifier[0].set_rates(cfg.rates_at())
        self.config = cfg
        return self

    def freeze_batchnorm(self) -> "DeepLabV3":
        """Stage 2 (Section 4.1): every BatchNorm keeps its running statistics and affine parameters for the
        rest of the model's life: out of the gradient, and in eval mode whatever ``train()`` is called."""
        self.bn_frozen = True
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "DeepLabV3":
        super().train(mode)
        if self.bn_frozen:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images):
        logits = self.classifier(self.backbone(images)["out"])
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear",
                             align_corners=self.config.align_corners)


def _init_weights(model: DeepLabV3, zero_init_last: bool) -> None:
    """He init for convolutions, BN as identity; then the start that trains from scratch: the backbone's own
    policy (``zero_init_last``: ResNet's residual units begin as identity), and the logits begin near 0 (loss
    ln C), so the first iterations are not spent undoing huge outputs. Pretrained weights loaded afterwards
    replace what they cover."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    model.backbone.init_weights(zero_init_last)
    logits = model.classifier[-1]
    nn.init.normal_(logits.weight, std=0.01)
    nn.init.zeros_(logits.bias)


def load_backbone_weights(model: DeepLabV3, state: dict) -> dict:
    """Load a torchvision ImageNet classifier's state dict (e.g. ``resnet101-*.pth``) into the backbone, its
    keys mapped by the backbone's ``from_torchvision``.

    Returns ``{"loaded": n, "missing": [...], "unexpected": [...]}``; the classifier (``fc.*``) is expected to be
    unexpected. Raises ValueError when shapes disagree or nothing matches (the caller names the file).
    """
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    else:
        state = model.backbone.from_torchvision(state)
    own = model.backbone.state_dict()
    matched = {k: v for k, v in state.items() if k in own}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in matched.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"backbone weights do not fit {model.config.backbone} "
                         f"({len(wrong)} shape mismatches, e.g. {wrong[0]})")
    if not matched:
        raise ValueError(f"no {model.backbone.torchvision_keys} found")
    model.backbone.load_state_dict(matched, strict=False)
    return {"loaded": len(matched), "missing": sorted(set(own) - set(matched)),
            "unexpected": sorted(set(state) - set(own))}


def build_model(cfg: Optional[ModelConfig] = None, zero_init_last: bool = True, **overrides) -> DeepLabV3:
    """The one builder: ``build_model(ModelConfig(...))`` or ``build_model(backbone="resnet50", ...)``.
    The weights start as for training from scratch (see `_init_weights`)."""
    if cfg is None:
        cfg = ModelConfig(**overrides)
    elif overrides:
        cfg = ModelConfig(**{**cfg.__dict__, **overrides})
    return DeepLabV3(cfg, zero_init_last)
