"""Switching output stride on the same weights is an exact densification (issue 18).

The reference is independent of the layout code: the backbone at the fine stride, sampled every
coarse/fine pixels, must equal the backbone at the coarse stride (eval mode, randomized BatchNorm statistics
and affine parameters, so no unit is an identity and no layer hides a wrong rate).
"""
import itertools

import pytest
import torch

from deeplab import ModelConfig, build_model
from deeplab.model import block_layout, densifies

pytestmark = pytest.mark.usefixtures("one_thread")

STRIDES = (4, 8, 16, 32, 64, 128, 256)


def _randomized(cfg: ModelConfig, seed: int = 0):
    """An eval-mode model whose BatchNorms are not identities (random statistics and affine parameters)."""
    torch.manual_seed(seed)
    model = build_model(cfg, zero_init_last=False).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _features(model, x, output_stride):
    with torch.no_grad():
        model.set_output_stride(output_stride)
        return model.backbone(x)["out"]


def _max_relative_gap(coarse_map, fine_map, step):
    sampled = fine_map[..., ::step, ::step]
    assert sampled.shape == coarse_map.shape
    return float((sampled - coarse_map).abs().max() / coarse_map.abs().max())


def test_os16_to_os8_densifies_backbone_and_aspp_atrous_branches():
    """ResNet-50 (several units per block, so both halves of the rule are exercised), as the issue measured:
    before the fix OS8 differed from OS16 by 12% of the largest value; now by float rounding only."""
    model = _randomized(ModelConfig(backbone="resnet50", num_classes=3, aspp_channels=16, output_stride=16))
    x = torch.randn(1, 3, 65, 65)
    f16, f8 = _features(model, x, 16), _features(model, x, 8)
    assert f16.shape[-2:] == (5, 5) and f8.shape[-2:] == (9, 9)
    assert _max_relative_gap(f16, f8, 2) < 1e-5
    aspp = model.classifier[0]
    with torch.no_grad():
        for index in range(4):  # the 1x1 branch and the three atrous branches (now at rates 12, 24, 36)
            branch = aspp.convs[index]
            model.set_output_stride(8)
            dense = branch(f8)
            model.set_output_stride(16)
            assert _max_relative_gap(branch(f16), dense, 2) < 1e-5, f"ASPP branch {index}"
        # image pooling averages a denser map: it may differ, and with a 5x5 vs 9x9 map it does
        pooled16, pooled8 = aspp.convs[4](f16), aspp.convs[4](f8)
        assert float((pooled16.mean() - pooled8.mean()).abs()) > 0


@pytest.mark.parametrize("layout,multi_grid,exact_pairs", [
    ("exact", (1, 2, 4), {(8, 4), (16, 4), (16, 8)}),
    ("torchvision", (1, 1, 1), set(itertools.combinations(reversed(STRIDES), 2))),
    ("legacy", (1, 2, 4), set()),
])
def test_every_switch_the_config_allows_is_exact_exactly_where_documented(layout, multi_grid, exact_pairs):
    """Every pair of strides 4-256 (cascade-only model, block4..block7): `densifies` says which pairs are
    exact (block_layout's docstring), and the computed features agree with it pair by pair."""
    cfg = ModelConfig(backbone="resnet_tiny", num_classes=2, output_stride=16, cascade_blocks=3, aspp=False,
                      multi_grid=multi_grid, atrous_layout=layout)
    model = _randomized(cfg)
    x = torch.randn(1, 3, 257, 257)  # OS256 still leaves a 2x2 map, so rate changes stay visible
    features = {s: _features(model, x, s) for s in STRIDES}
    predicted = {(a, b) for a, b in itertools.combinations(reversed(STRIDES), 2) if densifies(cfg, a, b)}
    assert predicted == exact_pairs
    for coarse, fine in itertools.combinations(reversed(STRIDES), 2):
        gap = _max_relative_gap(features[coarse], features[fine], coarse // fine)
        assert (gap < 1e-5) == ((coarse, fine) in exact_pairs), (coarse, fine, gap)


def test_block4_keeps_the_papers_multi_grid_rule():
    """Section 3.2.1: (2, 4, 8) at OS16 and (4, 8, 16) at OS8 with Multi-Grid (1, 2, 4); the cascaded blocks
    double it per block, whatever the layout of blocks 2-3."""
    for layout in ("exact", "legacy"):
        cfg = ModelConfig(output_stride=16, cascade_blocks=2, atrous_layout=layout)
        assert [r for _, r in block_layout(cfg)[3:]] == [[2, 4, 8], [4, 8, 16], [8, 16, 32]]
        assert block_layout(cfg, 8)[3][1] == [4, 8, 16]
    assert block_layout(ModelConfig(output_stride=8, atrous_layout="legacy"))[2][1] == [2] * 23
    assert block_layout(ModelConfig(output_stride=8))[2][1] == [1] + [2] * 22


def test_torchvision_layout_has_no_multi_grid():
    with pytest.raises(ValueError, match="model.atrous_layout='torchvision' has no Multi-Grid"):
        ModelConfig(atrous_layout="torchvision")
    with pytest.raises(ValueError, match="allowed: exact, torchvision, legacy"):
        ModelConfig(atrous_layout="dense")


# ---------------------------------------------------------------------------------------------------------
# Checkpoints record the layout they were trained with


def _rewrite(path, edit):
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)


def _as_before_issue_18(payload):
    """A file as the code before issue 18 wrote it: no atrous_layout field, and model.aux_head."""
    for model_cfg in (payload["model_config"], (payload.get("experiment") or {}).get("model") or {}):
        model_cfg.pop("atrous_layout", None)
        model_cfg["aux_head"] = False


def test_a_new_checkpoint_records_its_layout(tmp_path):
    from deeplab import load_checkpoint, save_checkpoint
    from deeplab.config import ExperimentConfig

    cfg = ModelConfig(backbone="resnet_tiny", num_classes=3, aspp_channels=8)
    save_checkpoint(tmp_path / "m.ckpt", build_model(cfg), ExperimentConfig(model=cfg))
    payload = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert payload["model_config"]["atrous_layout"] == "exact"
    assert payload["experiment"]["model"]["atrous_layout"] == "exact"
    assert load_checkpoint(tmp_path / "m.ckpt").config.atrous_layout == "exact"


@pytest.mark.parametrize("trained_at", [8, 16])
def test_an_old_checkpoint_keeps_the_legacy_rule_and_its_outputs_at_every_stride(tmp_path, trained_at):
    """A stage-2 file trained at OS8 before issue 18 must give the outputs it gave then; an OS16 file gets
    at OS8 what it got then (the legacy layout, not a densification)."""
    from deeplab import load_checkpoint, save_checkpoint
    from deeplab.config import ExperimentConfig

    old_rule = ModelConfig(backbone="resnet_tiny", num_classes=3, aspp_channels=8, output_stride=trained_at,
                           atrous_layout="legacy")
    trained = _randomized(old_rule)
    path = tmp_path / "old.ckpt"
    save_checkpoint(path, trained, ExperimentConfig(model=old_rule))
    _rewrite(path, _as_before_issue_18)
    ckpt = load_checkpoint(path)
    assert ckpt.config.atrous_layout == "legacy" and ckpt.experiment.model.atrous_layout == "legacy"
    assert [u.conv2.dilation[0] for u in ckpt.model.backbone.layer3] == [1 if trained_at == 16 else 2]
    x = torch.randn(1, 3, 49, 49)
    with torch.no_grad():
        for output_stride in (trained_at, 8):
            trained.set_output_stride(output_stride)
            ckpt.model.set_output_stride(output_stride)
            torch.testing.assert_close(ckpt.model(x), trained(x), rtol=0, atol=0)


def test_an_old_torchvision_checkpoint_keeps_torchvisions_layout_and_drops_its_aux_head(tmp_path):
    from deeplab import load_checkpoint, save_checkpoint

    cfg = ModelConfig(backbone="resnet_tiny", num_classes=3, aspp_channels=8, head="torchvision",
                      multi_grid=(1, 1, 1), output_stride=8)
    model = _randomized(cfg)
    path = tmp_path / "tv.ckpt"
    save_checkpoint(path, model, cfg)

    def old_with_aux(payload):
        _as_before_issue_18(payload)
        payload["model_config"]["aux_head"] = True
        payload["model"]["aux_classifier.0.weight"] = torch.zeros(8, 32, 3, 3)
        payload["model"]["aux_classifier.4.bias"] = torch.zeros(3)

    _rewrite(path, old_with_aux)
    ckpt = load_checkpoint(path)
    assert ckpt.config.atrous_layout == "torchvision"
    assert not hasattr(ckpt.model, "aux_classifier")
    assert not any(k.startswith("aux_classifier.") for k in ckpt.model.state_dict())
    x = torch.randn(1, 3, 41, 41)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(x), model(x), rtol=0, atol=0)


def test_a_resumed_run_keeps_the_layout_it_began_with_and_a_new_stage_takes_the_exact_rule(tmp_path):
    """Resuming a stage-2 run (OS8) begun before issue 18 must not switch its rule mid-run; a new run
    initialized from that file (train.init_from) is a new network and gets the config's rule."""
    from deeplab import save_checkpoint
    from deeplab.config import ExperimentConfig, TrainConfig
    from deeplab.train_loop import build_model_for_training

    old = ModelConfig(backbone="resnet_tiny", num_classes=3, aspp_channels=8, output_stride=8, atrous_layout="legacy")
    path = tmp_path / "old.ckpt"
    save_checkpoint(path, build_model(old), ExperimentConfig(model=old))
    _rewrite(path, _as_before_issue_18)
    new = ExperimentConfig(model=ModelConfig(backbone="resnet_tiny", num_classes=3, aspp_channels=8, output_stride=8))
    resumed, _ = build_model_for_training(new, str(path))
    assert resumed.config.atrous_layout == "legacy" and resumed.backbone.layer3[0].conv2.dilation == (2, 2)
    stage2 = ExperimentConfig(**{**new.__dict__, "train": TrainConfig(init_from=str(path))})
    started, _ = build_model_for_training(stage2, None)
    assert started.config.atrous_layout == "exact" and started.backbone.layer3[0].conv2.dilation == (1, 1)


def test_the_layout_reaches_an_exported_models_metadata(tmp_path):
    """Export rebuilds the model from the checkpoint: the record travels in the model config it embeds."""
    pytest.importorskip("onnx")
    from deeplab import load_checkpoint, save_checkpoint
    from export.to_onnx import checkpoint_model

    cfg = ModelConfig(backbone="resnet_tiny", num_classes=3, aspp_channels=8, output_stride=8)
    save_checkpoint(tmp_path / "old.ckpt", build_model(cfg), cfg)
    _rewrite(tmp_path / "old.ckpt", _as_before_issue_18)
    model, meta, _ = checkpoint_model(load_checkpoint(tmp_path / "old.ckpt"), 8)
    assert meta["model_config"]["atrous_layout"] == "legacy" and model.config.atrous_layout == "legacy"
    assert [u.conv2.dilation[0] for u in model.backbone.layer3] == [2]


if __name__ == "__main__":  # the figure in docs/model.md: python tests/test_densify.py
    image = torch.randn(1, 3, 129, 129, generator=torch.Generator().manual_seed(1))
    for rule in ("legacy", "exact"):  # legacy: the rule before issue 18; same weights for both
        net = _randomized(ModelConfig(backbone="resnet50", output_stride=16, atrous_layout=rule))
        f16, f8 = _features(net, image, 16), _features(net, image, 8)[..., ::2, ::2]
        print(f"atrous_layout {rule}: max |OS8[::2, ::2] - OS16| = {(f8 - f16).abs().max():.4g} "
              f"(largest |OS16| value {f16.abs().max():.4g})")
