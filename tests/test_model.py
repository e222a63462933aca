"""The model against the paper (Sections 3-4) and torchvision's published architecture."""
import pytest
import torch

from deeplab import ModelConfig, build_model
from deeplab.config import ConfigError
from deeplab.model import block_layout


def _block4_rates(output_stride, multi_grid, backbone="resnet101"):
    return block_layout(ModelConfig(backbone=backbone, output_stride=output_stride, multi_grid=multi_grid))[3][1]


# Section 3.2.1: "when output_stride = 16 and Multi_Grid = (1, 2, 4), the three convolutions will have
# rates = 2 * (1, 2, 4) = (2, 4, 8) in the block4". Block rate: 1 at OS32, 2 at OS16, 4 at OS8.
@pytest.mark.parametrize("output_stride,block_rate", [(32, 1), (16, 2), (8, 4)])
@pytest.mark.parametrize("multi_grid", [(1, 1, 1), (1, 2, 1), (1, 2, 3), (1, 2, 4), (2, 2, 2)])
def test_block4_rates_are_unit_rates_times_block_rate(output_stride, block_rate, multi_grid):
    assert _block4_rates(output_stride, multi_grid) == [block_rate * r for r in multi_grid]


def test_paper_examples_literally():
    assert _block4_rates(16, (1, 2, 4)) == [2, 4, 8]
    assert _block4_rates(8, (1, 2, 4)) == [4, 8, 16]


def test_strides_and_earlier_block_rates():
    # OS16: block3 keeps its stride; OS8: block3's first unit loses its stride and keeps its input's rate 1
    # (what it saw at OS16, with stride 2), the units after it are dilated by 2.
    l16 = block_layout(ModelConfig(output_stride=16))
    l8 = block_layout(ModelConfig(output_stride=8))
    l32 = block_layout(ModelConfig(output_stride=32, multi_grid=(1, 1, 1)))
    assert [s for s, _ in l32] == [1, 2, 2, 2] and all(r == [1] * len(r) for _, r in l32)
    assert [s for s, _ in l16] == [1, 2, 2, 1] and set(l16[2][1]) == {1}
    assert [s for s, _ in l8] == [1, 2, 1, 1] and l8[2][1] == [1] + [2] * 22


@pytest.mark.parametrize("cascade", [1, 2, 3])
def test_cascaded_blocks_double_the_rate_with_multi_grid(cascade):
    # Figure 3(b) at OS16: block4..block7 have rates 2, 4, 8, 16, each times the Multi-Grid unit rates.
    layout = block_layout(ModelConfig(output_stride=16, multi_grid=(1, 2, 4), cascade_blocks=cascade))
    assert len(layout) == 4 + cascade
    for i, (stride, rates) in enumerate(layout[3:]):
        assert stride == 1
        assert rates == [2 ** (i + 1) * r for r in (1, 2, 4)]


def test_module_dilations_follow_layout_and_switch_in_place():
    model = build_model(ModelConfig(backbone="resnet50", output_stride=16, multi_grid=(1, 2, 4)))
    assert [u.conv2.dilation[0] for u in model.backbone.layer4] == [2, 4, 8]
    assert model.backbone.layer3[0].conv2.stride == (2, 2)
    assert [b[0].dilation[0] for b in model.classifier[0].convs[1:4]] == [6, 12, 18]
    model.set_output_stride(8)
    assert [u.conv2.dilation[0] for u in model.backbone.layer4] == [4, 8, 16]
    assert model.backbone.layer3[0].conv2.stride == (1, 1) and model.backbone.layer3[0].downsample[0].stride == (1, 1)
    assert [u.conv2.dilation[0] for u in model.backbone.layer3] == [1, 2, 2, 2, 2, 2]
    # Section 3.3: "the rates are doubled when output_stride = 8"; halved at 32.
    assert [b[0].dilation[0] for b in model.classifier[0].convs[1:4]] == [12, 24, 36]
    assert all(b[0].padding == b[0].dilation for b in model.classifier[0].convs[1:4])
    model.set_output_stride(32)
    assert [b[0].dilation[0] for b in model.classifier[0].convs[1:4]] == [3, 6, 9]
    assert model.backbone.layer4[0].conv2.stride == (2, 2)


def test_feature_map_sizes_for_513_input(tiny_model_config):
    model = build_model(tiny_model_config).eval()
    x = torch.randn(1, 3, 513, 513)
    with torch.no_grad():
        assert model.backbone(x)["out"].shape[-2:] == (33, 33)
        assert model(x).shape == (1, 5, 513, 513)
        model.set_output_stride(8)
        assert model.backbone(x)["out"].shape[-2:] == (65, 65)
        assert model(x).shape == (1, 5, 513, 513)
        model.set_output_stride(32)
        assert model.backbone(x)["out"].shape[-2:] == (17, 17)


@pytest.mark.parametrize("size", [(97, 129), (100, 75)])
def test_output_at_input_size_for_odd_sizes(tiny_model_config, size):
    model = build_model(tiny_model_config).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, *size)).shape == (2, 5, *size)


def test_switching_in_place_equals_building_at_that_stride(tiny_model_config):
    a = build_model(tiny_model_config).eval()
    b = build_model(ModelConfig(**{**tiny_model_config.__dict__, "output_stride": 8})).eval()
    b.load_state_dict(a.state_dict())
    a.set_output_stride(8)
    x = torch.randn(1, 3, 97, 97)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_same_weights_agree_across_output_strides(tiny_model_config):
    """Trained at OS16 on a scene of large shapes, the same weights at OS8 label almost the same pixels."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**tiny_model_config.__dict__, "num_classes": 3})
    model = build_model(cfg)
    yy, xx = torch.meshgrid(torch.arange(97), torch.arange(97), indexing="ij")
    def scene(shift):
        target = torch.zeros(97, 97, dtype=torch.long)
        target[(yy - 30 - shift) ** 2 + (xx - 35) ** 2 < 400] = 1
        target[(yy > 55) & (xx > 50 + shift)] = 2
        colours = torch.tensor([[0.0, 0.0, 0.0], [1.5, -1.0, 0.5], [-1.0, 1.0, 1.5]])
        image = colours[target].permute(2, 0, 1) + 0.3 * torch.randn(3, 97, 97)
        return image, target
    batch = [scene(s) for s in (0, 4, 8, 12)]
    images, targets = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        p16 = model(images).argmax(1)
        model.set_output_stride(8)
        p8 = model(images).argmax(1)
    assert (p16 == targets).float().mean() > 0.9
    assert (p8 == p16).float().mean() > 0.85


def test_image_pooling_and_rate_count_change_the_aspp():
    four = build_model(ModelConfig(backbone="resnet_tiny", aspp_rates=(6, 12, 18, 24), aspp_channels=8))
    assert len(four.classifier[0].convs) == 6  # 1x1 + four 3x3 + image pooling (Table 5)
    assert four.classifier[0].project[0].in_channels == 6 * 8
    nopool = build_model(ModelConfig(backbone="resnet_tiny", image_pooling=False, aspp_channels=8))
    assert len(nopool.classifier[0].convs) == 4
    assert nopool.classifier[0].project[0].in_channels == 4 * 8


@pytest.mark.parametrize("bad,needle", [
    (dict(output_stride=12), "4, 8, 16, 32"),
    (dict(multi_grid=(1, 2)), "3 unit rates"),
    (dict(aspp_rates=(0, 12, 18)), ">= 1"),
    (dict(backbone="resnet34"), "resnet50"),
    (dict(cascade_blocks=4), "0-3"),
    (dict(head="fcn"), "paper"),
])
def test_invalid_combinations_fail_at_construction(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**bad)


def _torchvision_deeplab_keys(depth_units, num_classes=21):
    """torchvision's DeepLabV3 state-dict layout written out from its documented structure (FACTS.md)."""
    shapes = {}
    def bn(prefix, c):
        for n in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{n}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()
    shapes["backbone.conv1.weight"] = (64, 3, 7, 7)
    bn("backbone.bn1", 64)
    inplanes = 64
    for li, (units, planes) in enumerate(zip(depth_units, (64, 128, 256, 512)), start=1):
        for u in range(units):
            p = f"backbone.layer{li}.{u}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if u == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    shapes["classifier.0.convs.0.0.weight"] = (256, 2048, 1, 1)
    bn("classifier.0.convs.0.1", 256)
    for i in (1, 2, 3):
        shapes[f"classifier.0.convs.{i}.0.weight"] = (256, 2048, 3, 3)
        bn(f"classifier.0.convs.{i}.1", 256)
    shapes["classifier.0.convs.4.1.weight"] = (256, 2048, 1, 1)
    bn("classifier.0.convs.4.2", 256)
    shapes["classifier.0.project.0.weight"] = (256, 1280, 1, 1)
    bn("classifier.0.project.1", 256)
    shapes["classifier.1.weight"] = (256, 256, 3, 3)
    bn("classifier.2", 256)
    shapes["classifier.4.weight"] = (num_classes, 256, 1, 1)
    shapes["classifier.4.bias"] = (num_classes,)
    return shapes


@pytest.mark.parametrize("backbone,units,params", [
    ("resnet50", (3, 4, 6, 3), 39_638_869),
    ("resnet101", (3, 4, 23, 3), 58_630_997),
])
def test_torchvision_head_matches_torchvision_layout_and_parameter_count(backbone, units, params):
    cfg = ModelConfig(backbone=backbone, output_stride=8, multi_grid=(1, 1, 1), head="torchvision")
    model = build_model(cfg)
    assert cfg.atrous_layout == "torchvision"
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == _torchvision_deeplab_keys(units)
    assert sum(p.numel() for p in model.parameters()) == params  # torchvision's deeplabv3_resnet50/101, no aux head
    # torchvision's OS8 backbone: layer3 dilations (1, 2, 2, ...), layer4 (2, 4, 4); ASPP rates 12, 24, 36.
    assert [u.conv2.dilation[0] for u in model.backbone.layer4] == [2, 4, 4]
    assert [u.conv2.dilation[0] for u in model.backbone.layer3][:3] == [1, 2, 2]
    assert [b[0].dilation[0] for b in model.classifier[0].convs[1:4]] == [12, 24, 36]


def test_builder_starts_weights_for_training_from_scratch(tiny_model_config):
    """The init policy lives in the model: residual units start as identity (last BN scale 0, timm's
    zero_init_last) and the logits near 0; zero_init_last=False keeps the last BN scales at 1."""
    from deeplab.backbones.resnet import Bottleneck

    torch.manual_seed(0)
    model = build_model(tiny_model_config)
    units = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert units and all(float(u.bn3.weight.abs().sum()) == 0 for u in units)
    logits = model.classifier[-1]
    assert float(logits.weight.std()) < 0.02 and float(logits.bias.abs().sum()) == 0
    plain = build_model(tiny_model_config, zero_init_last=False)
    assert all(bool((u.bn3.weight == 1).all()) for u in plain.modules() if isinstance(u, Bottleneck))
