"""The backbone seam (issue 22): a registry every part reads, weight decay by shape, a toy backbone registered
from this file alone, and MobileNetV3-Large against torchvision's own deeplabv3_mobilenet_v3_large (a
reference recorded from torchvision: tests/mobilenet_reference.py)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeplab import ModelConfig, build_model, load_checkpoint
from deeplab.backbones import BackboneSpec, backbone_names, register_backbone
from deeplab.backbones.base import Backbone, stage_layout
from deeplab.checkpoint import CHECKPOINT_FILE
from deeplab.config import ConfigError, load_config
from deeplab.receptive import feature_size
from deeplab.train_loop import Worker, param_groups, train
from mobilenet_reference import REFERENCE, example_input, weights

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
MOBILENET = "mobilenet_v3_large"


def tiny_run(backbone: str, *extra):
    """One worker, 65 px synthetic crops, small ASPP: behaviour, not accuracy."""
    return load_config(None, [
        f"model.backbone={backbone}", "model.aspp_channels=16", "model.num_classes=4",
        "data.synthetic_classes=4", "data.synthetic_size=80", "data.crop_size=65", "data.synthetic_train=4",
        "data.synthetic_val=2", "data.loader_workers=0", "train.batch_size=2", "train.max_iterations=1",
        "train.eval_interval=1", "train.log_interval=100", "train.lr=0.01", "train.amp=off",
        "train.bn_momentum=0.5", *extra])


def trained_step(cfg) -> dict:
    """Run `deeplab.train_loop.train` for cfg's iterations; return the metrics and the last checkpoint's model."""
    saved = []
    metrics = train(cfg, Worker(report=lambda m, d: d and saved.append(load_checkpoint(Path(d) / CHECKPOINT_FILE))))
    return {"metrics": metrics, "checkpoint": saved[-1]}


# ---------------------------------------------------------------------------------------------------------
# Weight decay by parameter shape


def test_weight_decay_by_shape_leaves_layer_norm_and_group_norm_undecayed():
    """1-D parameters (any norm's scale/shift, any bias) get no decay; conv and linear weights do."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.GroupNorm(2, 8), nn.BatchNorm2d(8),
                          nn.Flatten(), nn.LayerNorm(8 * 4), nn.Linear(8 * 4, 2))
    model[2].requires_grad_(False)  # frozen parameters are left out
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([model[0].weight, model[5].weight])
    assert ids(no_decay["params"]) == ids([model[0].bias, model[1].weight, model[1].bias, model[4].weight,
                                           model[4].bias, model[5].bias])


# ---------------------------------------------------------------------------------------------------------
# A toy backbone, registered here and nowhere else


class ToyBackbone(Backbone):
    """Stem conv (stride 2), then four one-unit stages with GroupNorm: stride 32, atrous below it."""

    out_channels = 12
    torchvision_keys = "toy keys"

    @classmethod
    def layout(cls, cfg, output_stride=None):
        return stage_layout(cfg, output_stride or cfg.output_stride, 2, (1, 1, 1, 1), grid_from=4)

    def __init__(self, cfg):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, 2, 1)
        self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(12, 12, 3, 1, 1), nn.GroupNorm(3, 12), nn.ReLU())
                                    for _ in range(4))
        self.set_output_stride(cfg)

    def configure(self, layout):
        for stage, (stride, (rate,)) in zip(self.stages, layout):
            stage[0].stride, stage[0].dilation, stage[0].padding = (stride, stride), (rate, rate), (rate, rate)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return {"out": x}


register_backbone("toy", BackboneSpec(ToyBackbone, output_strides=(8, 16, 32)))


def test_toy_backbone_from_this_file_builds_switches_stride_and_trains_a_step():
    assert "toy" in backbone_names()
    model = build_model(ModelConfig(backbone="toy", num_classes=3, aspp_channels=8)).eval()
    x = torch.randn(2, 3, 65, 65)
    assert model(x).shape == (2, 3, 65, 65)
    assert model.backbone(x)["out"].shape[-2:] == (feature_size(65, 16, "toy"),) * 2 == (5, 5)
    model.set_output_stride(8)
    assert model.backbone(x)["out"].shape[-2:] == (9, 9) and model.classifier[0].convs[1][0].dilation == (12, 12)
    with pytest.raises(ConfigError, match="model.output_stride=4 is not allowed for toy; use one of 8, 16, 32"):
        ModelConfig(backbone="toy", output_stride=4)
    run = trained_step(tiny_run("toy"))
    assert run["metrics"]["iteration"] == 1 and run["checkpoint"].config.backbone == "toy"
    groups = run["checkpoint"].state["optimizer"]["param_groups"]
    # decayed: the toy's 5 conv weights, ASPP's 5 branch convs, its projection and the logits conv; not: the
    # toy's 5 biases and 4 GroupNorms' scale/shift, ASPP's 6 BatchNorms' scale/shift and the logits' bias
    assert [len(g["params"]) for g in groups] == [5 + 5 + 1 + 1, 5 + 8 + 12 + 1]


# ---------------------------------------------------------------------------------------------------------
# MobileNetV3-Large


def _torchvision_file(tmp_path, with_aux=True) -> Path:
    ref = torch.load(REFERENCE, weights_only=True)
    state = weights(ref["keys"], ref["shapes"])
    if not with_aux:
        state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    path = tmp_path / "deeplabv3_mobilenet_v3_large-fc3c493d.pth"
    torch.save(state, path)
    return path


def test_torchvision_deeplabv3_mobilenet_imports_with_its_parameters_and_outputs(tmp_path):
    """The importer's command line on torchvision's file (aux head included): every other tensor loads, and
    the logits equal those torchvision's own model computed from the same weights."""
    ref = torch.load(REFERENCE, weights_only=True)
    src, out = _torchvision_file(tmp_path), tmp_path / "m.ckpt"
    proc = subprocess.run([sys.executable, "-m", "deeplab.import_torchvision", str(src), "-o", str(out),
                           "--arch", "deeplabv3_mobilenet_v3_large"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "as mobilenet_v3_large head=torchvision OS16" in proc.stdout and "(8 aux_classifier tensors" in proc.stdout
    ckpt = load_checkpoint(out)
    state = weights(ref["keys"], ref["shapes"])
    own = ckpt.model.state_dict()
    assert set(own) == {k for k in state if not k.startswith("aux_classifier.")}
    assert all(torch.equal(own[k], state[k]) for k in own)
    aux = 40 * 10 * 9 + 2 * 10 + 10 * 21 + 21  # torchvision's FCNHead on C2 (40 channels), not imported
    assert sum(p.numel() for p in ckpt.model.parameters()) == ref["num_params"] - aux == 11_029_328 - aux
    with torch.no_grad():
        logits = ckpt.model.eval()(example_input())
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-4)


def test_mobilenet_os8_densifies_stage_c3_on_the_same_weights():
    """torchvision's layout at OS16 (last stage atrous, rate 2); OS8 removes C3's stride, C3 continues at rate 2
    after its first unit and the last stage at 4. With the squeeze-excite gates held constant (they pool the
    whole map, so they alone differ), OS8's features sampled every 2 pixels are OS16's."""
    cfg = ModelConfig(backbone=MOBILENET, num_classes=3, aspp_channels=8, multi_grid=(1, 1, 1), head="torchvision")
    model = build_model(cfg).eval()
    dilations = lambda: [u.block[u.depthwise_index][0].dilation[0] for u in list(model.backbone.children())[1:16]]  # noqa
    assert dilations() == [1] * 12 + [2, 2, 2]
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        if hasattr(m, "fc2"):
            nn.init.zeros_(m.fc2.weight)
            nn.init.constant_(m.fc2.bias, 1.0)
    x = torch.randn(1, 3, 65, 65, generator=g)
    with torch.no_grad():
        f16 = model.backbone(x)["out"]
        model.set_output_stride(8)
        f8 = model.backbone(x)["out"]
    assert dilations() == [1] * 6 + [1, 2, 2, 2, 2, 2] + [4, 4, 4]
    assert f16.shape[-2:] == (5, 5) and f8.shape[-2:] == (9, 9)
    assert float((f8[..., ::2, ::2] - f16).abs().max() / f16.abs().max()) < 1e-5


def test_mobilenet_trains_a_step_and_rejects_what_it_lacks(tmp_path):
    run = trained_step(tiny_run(MOBILENET))
    assert run["metrics"]["iteration"] == 1 and run["checkpoint"].config.backbone == MOBILENET
    for bad, field in (("model.cascade_blocks=1", "model.cascade_blocks"), ("model.output_stride=64",
                                                                            "model.output_stride")):
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"model.backbone={MOBILENET}", bad])
        assert field in str(info.value) and MOBILENET in str(info.value) and "\n" not in str(info.value)


def test_imagenet_mobilenet_file_loads_into_the_backbone():
    from deeplab.import_torchvision import detect_arch, import_state_dict

    backbone = build_model(ModelConfig(backbone=MOBILENET)).backbone.state_dict()
    imagenet = {f"features.{k}": torch.randn_like(v.float()).to(v.dtype) for k, v in backbone.items()}
    imagenet.update({"classifier.0.weight": torch.zeros(1280, 960), "classifier.3.bias": torch.zeros(1000)})
    assert detect_arch(imagenet) == MOBILENET
    model, cfg, report = import_state_dict(imagenet)
    assert cfg.backbone == MOBILENET and cfg.head == "paper"
    assert report["loaded"] == len(backbone) and report["missing"] == []
    assert report["unexpected"] == ["classifier.0.weight", "classifier.3.bias"]
    assert torch.equal(model.backbone.state_dict()["16.0.weight"], imagenet["features.16.0.weight"])


def test_hardswish_and_gates_as_the_paper_defines_them():
    """Independent of the module code: hardswish(x) = x relu6(x + 3) / 6 and the SE gate relu6(x + 3) / 6."""
    from deeplab.backbones.mobilenet_v3 import SqueezeExcite

    se = SqueezeExcite(16)
    assert se.fc1.out_channels == 8  # 16 / 4 rounded to a multiple of 8
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        pooled = x.mean((2, 3), keepdim=True)
        gate = F.relu6(se.fc2(F.relu(se.fc1(pooled))) + 3) / 6
        torch.testing.assert_close(se(x), x * gate)
    assert sorted({m.fc1.out_channels for m in build_model(ModelConfig(backbone=MOBILENET)).modules()
                   if isinstance(m, SqueezeExcite)}) == [24, 32, 120, 168, 240]


@pytest.mark.slow
def test_mobilenet_exports_to_onnx_and_openvino_with_parity(tmp_path):
    """A MobileNetV3 checkpoint through the exporter users run (hardswish, hard sigmoid gates, depthwise atrous
    convs): the ONNX it exports at output stride 8 passes its onnxruntime parity check (else no file), the IR
    converted from it is checked against PyTorch here on another, non-square batch."""
    pytest.importorskip("openvino")
    from deeplab import save_checkpoint
    from export import to_openvino
    from export.metadata import read_ir_metadata
    from export.runners import OpenVINORunner

    torch.manual_seed(0)
    cfg = ModelConfig(backbone=MOBILENET, num_classes=3, aspp_channels=16)
    model = build_model(cfg).eval()
    for m in model.modules():  # BatchNorm that is no identity, so folding it is exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    ckpt = save_checkpoint(tmp_path / "m.ckpt", model, cfg)
    xml = tmp_path / "ir" / "model.xml"
    assert to_openvino.main([str(ckpt), "-o", str(xml)]) == 0
    meta = read_ir_metadata(xml)
    assert meta["backbone"] == MOBILENET and meta["output_stride"] == 8
    x = torch.randn(2, 3, 49, 65, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.set_output_stride(8)(x).numpy()
    out = OpenVINORunner(xml)(x)
    assert out.shape == ref.shape == (2, 3, 49, 65)
    assert abs(out - ref).max() <= 1e-3 * max(1.0, abs(ref).max())
