"""Importing torchvision-layout files (made in the test) into the checkpoint format."""
import subprocess
import sys
from pathlib import Path

import torch

from deeplab import ModelConfig, build_model, load_checkpoint
from deeplab.import_torchvision import detect_arch, import_state_dict

ROOT = Path(__file__).parents[1]


def _torchvision_like_deeplab50():
    """A deeplabv3_resnet50 state dict with torchvision's keys: our torchvision-head model's keys, random values."""
    cfg = ModelConfig(backbone="resnet50", output_stride=8, multi_grid=(1, 1, 1), head="torchvision")
    model = build_model(cfg)
    torch.manual_seed(1)
    return {k: torch.randn_like(v.float()).to(v.dtype) if v.dtype.is_floating_point else v
            for k, v in model.state_dict().items()}


AUX_HEAD = {  # torchvision's FCNHead on layer3 (aux_classifier.{0: conv, 1: BN, 4: conv with bias})
    "aux_classifier.0.weight": (256, 1024, 3, 3), "aux_classifier.1.weight": (256,), "aux_classifier.1.bias": (256,),
    "aux_classifier.1.running_mean": (256,), "aux_classifier.1.running_var": (256,),
    "aux_classifier.4.weight": (21, 256, 1, 1), "aux_classifier.4.bias": (21,)}


def test_deeplab_file_imports_exactly_and_keeps_outputs(tmp_path):
    """torchvision's file with its auxiliary head: the head is dropped (and the output says so), everything
    else loads bit for bit, with torchvision's atrous layout (layer4 (2, 4, 4) at OS8)."""
    state = _torchvision_like_deeplab50()
    for k in list(state):
        if "running_var" in k:
            state[k] = state[k].abs() + 0.5
    with_aux = {**state, **{k: torch.rand(shape) for k, shape in AUX_HEAD.items()}}
    assert detect_arch(with_aux) == "deeplabv3_resnet50"
    src = tmp_path / "deeplabv3_resnet50_coco.pth"
    torch.save(with_aux, src)
    out = tmp_path / "model.ckpt"
    proc = subprocess.run([sys.executable, "-m", "deeplab.import_torchvision", str(src), "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "dropped torchvision's auxiliary head (7 aux_classifier tensors" in proc.stdout
    ckpt = load_checkpoint(out)
    assert ckpt.config.head == "torchvision" and ckpt.config.output_stride == 8
    assert ckpt.config.atrous_layout == "torchvision"
    assert [u.conv2.dilation[0] for u in ckpt.model.backbone.layer4] == [2, 4, 4]
    loaded = ckpt.model.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())


def test_imagenet_resnet_loads_into_backbone_with_report():
    resnet = {k[len("backbone."):]: v for k, v in build_model(ModelConfig(backbone="resnet101")).state_dict().items()
              if k.startswith("backbone.")}
    resnet["fc.weight"] = torch.zeros(1000, 2048)
    resnet["fc.bias"] = torch.zeros(1000)
    assert detect_arch(resnet) == "resnet101"
    model, cfg, report = import_state_dict(resnet)
    assert cfg.backbone == "resnet101" and cfg.head == "paper"
    assert report["unexpected"] == ["fc.bias", "fc.weight"] and report["missing"] == []
    assert report["loaded"] == len(resnet) - 2


def test_wrong_file_gives_one_line_error(tmp_path):
    bad = tmp_path / "random.pth"
    torch.save({"foo": torch.zeros(3)}, bad)
    proc = subprocess.run([sys.executable, "-m", "deeplab.import_torchvision", str(bad),
                           "-o", str(tmp_path / "o.ckpt")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "random.pth" in proc.stderr
    assert not (tmp_path / "o.ckpt").exists()
