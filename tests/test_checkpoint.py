"""Checkpoints: self-describing, atomic, never unpickle code, one-line errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deeplab import CheckpointError, build_model, load_checkpoint, save_checkpoint
from deeplab.config import ExperimentConfig


def test_round_trip_rebuilds_model_from_file_alone(tmp_path, tiny_model_config):
    model = build_model(tiny_model_config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 65, 65)).mean().backward()
    opt.step()
    exp = ExperimentConfig(model=tiny_model_config)
    exp.data.crop_size = 97
    path = save_checkpoint(tmp_path / "a.ckpt", model, exp, iteration=7, optimizer=opt.state_dict(),
                           metrics={"val_miou": 0.5}, rng=torch.get_rng_state())
    ckpt = load_checkpoint(path)
    assert ckpt.config == tiny_model_config
    assert ckpt.experiment.data.crop_size == 97
    assert ckpt.state["iteration"] == 7 and ckpt.state["metrics"]["val_miou"] == 0.5
    opt2 = torch.optim.SGD(ckpt.model.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt.state["optimizer"])
    x = torch.randn(1, 3, 65, 65)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(x), model(x))
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]  # no temp file left behind


def test_saves_the_models_current_output_stride(tmp_path, tiny_model_config):
    model = build_model(tiny_model_config).set_output_stride(8)
    save_checkpoint(tmp_path / "os8.ckpt", model, tiny_model_config)
    assert load_checkpoint(tmp_path / "os8.ckpt").config.output_stride == 8


def test_state_that_cannot_load_weights_only_is_refused_at_save(tmp_path, tiny_model_config):
    class Thing:
        pass
    with pytest.raises(TypeError, match="weights-only"):
        save_checkpoint(tmp_path / "x.ckpt", build_model(tiny_model_config), tiny_model_config, extra=Thing())
    assert not list(tmp_path.iterdir())


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_whose_pickle_would_run_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"format": "deeplabv3-checkpoint", "payload": _Exploit(marker)}, evil)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(evil)
    assert not marker.exists()
    message = str(info.value)
    assert str(evil) in message and "\n" not in message and "refused" in message


def test_truncated_file_gives_one_line_error(tmp_path, tiny_model_config):
    good = save_checkpoint(tmp_path / "good.ckpt", build_model(tiny_model_config), tiny_model_config)
    data = good.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(cut)
    assert str(cut) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint"])
def test_not_a_checkpoint(tmp_path, content):
    p = tmp_path / "junk.ckpt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_plain_state_dict_is_not_a_checkpoint_and_says_how_to_import(tmp_path, tiny_model_config):
    p = tmp_path / "resnet.pth"
    torch.save(build_model(tiny_model_config).backbone.state_dict(), p)
    with pytest.raises(CheckpointError, match="import_torchvision"):
        load_checkpoint(p)


def test_weights_for_another_architecture_are_rejected(tmp_path, tiny_model_config):
    path = save_checkpoint(tmp_path / "a.ckpt", build_model(tiny_model_config), tiny_model_config)
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["image_pooling"] = False  # the config no longer describes the weights
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_checkpoint(path)


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, tiny_model_config):
    """A writer killed mid-save must not leave a half-written file at the destination."""
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, build_model(tiny_model_config), tiny_model_config, iteration=1)
    script = (
        "import os, sys, torch\n"
        "from deeplab import build_model, save_checkpoint, ModelConfig\n"
        "real = torch.save\n"
        "def dying_save(obj, f, *a, **k):\n"
        "    fh = f if hasattr(f, 'write') else open(f, 'wb')\n"
        "    fh.write(b'partial'); fh.flush()\n"
        "    os._exit(9)\n"
        "torch.save = dying_save\n"
        f"save_checkpoint({str(path)!r}, "
        "build_model(ModelConfig(backbone='resnet_tiny', num_classes=5, aspp_channels=16)),"
        " ModelConfig(backbone='resnet_tiny', num_classes=5, aspp_channels=16), iteration=2)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    assert proc.returncode == 9
    assert load_checkpoint(path).state["iteration"] == 1
