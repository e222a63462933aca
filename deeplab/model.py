"""DeepLabv3 (Chen et al., 2017): a ResNet with atrous convolution, Multi-Grid, cascaded blocks and ASPP.

State-dict keys match torchvision's ResNet (``backbone.conv1``, ``backbone.layer4.0.conv2``, ...) and, with
``head="torchvision"``, torchvision's DeepLabV3 (``classifier.0.convs.*``), so published weights load.

The contract between parts: the backbone returns a dict of tensors (``out``: the last block); the head maps
``out`` to logits; the model upsamples logits to the input size.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import BACKBONE_LAYERS, BACKBONE_WIDTH, ModelConfig

# ---------------------------------------------------------------------------------------------------------
# Where atrous convolution goes: a pure function of the config, so the paper's rules are testable alone.


def block_layout(cfg: ModelConfig, output_stride: Optional[int] = None) -> list:
    """Per block (block1..block4, then cascaded block5..7): ``(stride, [dilation of each unit's 3x3 conv])``.

    Once the feature map reaches ``output_stride`` a block that would stride keeps stride 1 and the atrous rate
    doubles (Section 3.1). Where the doubled rate starts is ``cfg.atrous_layout``:

    - ``exact``: in block2-3 the unit whose stride is removed keeps the rate of its input and the units after
      it get the doubled rate (the authors' TF-slim ``stack_blocks_dense``); block4 and the cascaded blocks
      follow the paper's Multi-Grid rule, block rate x unit rate (Section 3.2.1: (2, 4, 8) at OS16, (4, 8, 16)
      at OS8 with (1, 2, 4)).
    - ``torchvision``: every block as block2-3 above (its ``_make_layer``; layer4 at OS8 is (2, 4, 4)).
    - ``legacy``: every unit of a block whose stride is removed gets the doubled rate (files written before
      the rule was recorded were trained so).

    Which output-stride switches on the same weights are exact (see `densifies`): with ``exact``, every pair
    of 4, 8 and 16, because only block2-3 lose strides between them; a pair that removes block4's or a
    cascaded block's stride is not, since that unit's Multi-Grid rate (block rate x r1) is twice what
    densifying needs. With ``torchvision`` every pair; with ``legacy`` none.
    """
    os_ = output_stride or cfg.output_stride
    units = list(BACKBONE_LAYERS[cfg.backbone]) + [BACKBONE_LAYERS[cfg.backbone][3]] * cfg.cascade_blocks
    layout = []
    current, rate = 4, 1  # the stem (7x7 stride-2 conv, stride-2 max pool) leaves stride 4
    for index, n_units in enumerate(units):
        input_rate = rate
        if index > 0 and current >= os_:
            stride, rate = 1, rate * 2
        else:
            stride = 1 if index == 0 else 2
            current *= stride
        layout.append((stride, _unit_rates(cfg, index, n_units, input_rate, rate)))
    return layout


def _unit_rates(cfg: ModelConfig, index: int, n_units: int, input_rate: int, rate: int) -> list:
    """The 3x3 rates of one block's units: ``input_rate`` reaches the block, ``rate`` is the block's rate."""
    if index >= 3 and cfg.atrous_layout != "torchvision":  # block4 and the cascaded blocks: Multi-Grid
        return [rate * cfg.multi_grid[u % 3] for u in range(n_units)]
    if cfg.atrous_layout == "legacy":
        return [rate] * n_units
    return [input_rate] + [rate] * (n_units - 1)


def densifies(cfg: ModelConfig, coarse: int, fine: int) -> bool:
    """Whether the backbone at output stride ``fine`` computes the ``coarse`` features at every position,
    i.e. its output sampled every ``coarse // fine`` pixels equals the ``coarse`` output (same weights, eval
    mode). Walks both layouts: a unit must use ``d`` times the coarse rate, where its input is ``d`` times
    denser; ASPP's atrous branches then follow (their rates scale by the same factor), image pooling not."""
    d = 1
    for (s_coarse, r_coarse), (s_fine, r_fine) in zip(block_layout(cfg, coarse), block_layout(cfg, fine)):
        for u, (a, b) in enumerate(zip(r_coarse, r_fine)):
            if b != d * a:
                return False
            if u == 0:
                d = d * s_coarse // s_fine
    return d == coarse // fine


# ---------------------------------------------------------------------------------------------------------
# Backbone


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv, as torchvision); its 3x3 conv may be atrous."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def configure(self, stride: int, dilation: int) -> None:
        """Set stride and atrous rate in place: same weights, another output stride."""
        self.conv2.stride = (stride, stride)
        self.conv2.dilation = (dilation, dilation)
        self.conv2.padding = (dilation, dilation)
        if self.downsample is not None:
            self.downsample[0].stride = (stride, stride)

    def forward(self, x):
        stride = self.conv2.stride[0]
        if self.downsample is not None:
            identity = self.downsample(x)
        else:  # a cascaded unit built without stride and switched to one: subsample, as a strided 1x1 would
            identity = x[..., ::stride, ::stride] if stride > 1 else x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetBackbone(nn.Module):
    """ResNet without its classifier; ``layer5..layer7`` are the paper's cascaded copies of block4."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = BACKBONE_WIDTH[cfg.backbone]
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layout = block_layout(cfg)
        inplanes = width
        self.block_names = []
        for index, (stride, rates) in enumerate(layout):
            planes = width * 2 ** min(index, 3)
            units = []
            for u, rate in enumerate(rates):
                units.append(Bottleneck(inplanes, planes, stride if u == 0 else 1, rate))
                inplanes = planes * Bottleneck.expansion
            name = f"layer{index + 1}"
            self.add_module(name, nn.Sequential(*units))
            self.block_names.append(name)
        self.out_channels = inplanes

    def configure(self, layout: list) -> None:
        for name, (stride, rates) in zip(self.block_names, layout):
            for u, (unit, rate) in enumerate(zip(getattr(self, name), rates)):
                unit.configure(stride if u == 0 else 1, rate)

    def forward(self, x) -> dict:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.block_names:
            x = getattr(self, name)(x)
        return {"out": x}


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
        self.backbone = ResNetBackbone(cfg)
        self.classifier = _head(cfg, self.backbone.out_channels)
        _init_weights(self, zero_init_last)

    @property
    def output_stride(self) -> int:
        return self.config.output_stride

    def set_output_stride(self, output_stride: int) -> "DeepLabV3":
        """Switch stride in place with the same weights (train at 16, infer at 8: Tables 4 and 6); which
        switches are exact densifications is said in `block_layout`."""
        cfg = ModelConfig(**{**self.config.__dict__, "output_stride": output_stride})  # validates
        self.backbone.configure(block_layout(cfg))
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
    """He init for convolutions, BN as identity; then the start that trains from scratch: with
    ``zero_init_last`` each residual unit begins as identity (its last BN scale 0, Goyal et al. 2017, timm's
    zero_init_last), and the logits begin near 0 (loss ln C), so the first iterations are not spent undoing
    huge outputs. Pretrained weights loaded afterwards replace what they cover."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_last:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
    logits = model.classifier[-1]
    nn.init.normal_(logits.weight, std=0.01)
    nn.init.zeros_(logits.bias)


def load_backbone_weights(model: DeepLabV3, state: dict) -> dict:
    """Load an ImageNet ResNet state dict (torchvision keys, e.g. ``resnet101-*.pth``) into the backbone.

    Returns ``{"loaded": n, "missing": [...], "unexpected": [...]}``; ``fc.*`` is expected to be unexpected.
    Raises ValueError when shapes disagree or nothing matches (the caller names the file).
    """
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    own = model.backbone.state_dict()
    matched = {k: v for k, v in state.items() if k in own}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in matched.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"backbone weights do not fit {model.config.backbone} "
                         f"({len(wrong)} shape mismatches, e.g. {wrong[0]})")
    if not matched:
        raise ValueError("no ResNet keys (conv1.weight, layer1.0.conv1.weight, ...) found")
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
