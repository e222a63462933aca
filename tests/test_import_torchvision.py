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
    cfg = ModelConfig(backbone="resnet50", output_stride=8, multi_grid=(1, 1, 1), head="torchvision", aux_head=True)
    model = build_model(cfg)
    torch.manual_seed(1)
    return {k: torch.randn_like(v.float()).to(v.dtype) if v.dtype.is_floating_point else v
            for k, v in model.state_dict().items()}


def test_deeplab_file_imports_exactly_and_keeps_outputs(tmp_path):
    state = _torchvision_like_deeplab50()
    for k in list(state):
        if "running_var" in k:
            state[k] = state[k].abs() + 0.5
    assert detect_arch(state) == "deeplabv3_resnet50"
    src = tmp_path / "deeplabv3_resnet50_coco.pth"
    torch.save(state, src)
    out = tmp_path / "model.ckpt"
    proc = subprocess.run([sys.executable, "-m", "deeplab.import_torchvision", str(src), "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(out)
    assert ckpt.config.head == "torchvision" and ckpt.config.output_stride == 8 and ckpt.config.aux_head
    loaded = ckpt.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


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
    proc = subprocess.run([sys.executable, "-m", "deeplab.import_torchvision", str(bad), "-o", str(tmp_path / "o.ckpt")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "random.pth" in proc.stderr
    assert not (tmp_path / "o.ckpt").exists()
