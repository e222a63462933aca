"""Issue 15's planted mistakes on the output side, each through the real command: the exit code, the one line
(no traceback) and nothing left behind."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deeplab import build_model, save_checkpoint
from deeplab.config import DataConfig, ExperimentConfig, ModelConfig

ROOT = Path(__file__).parents[1]


def _checkpoint(path: Path, backbone: str = "resnet_tiny") -> Path:
    cfg = ExperimentConfig(model=ModelConfig(backbone=backbone, num_classes=4, aspp_channels=16),
                           data=DataConfig(synthetic_size=49, synthetic_val=2, synthetic_classes=4))
    save_checkpoint(path, build_model(cfg.model), cfg)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistakes")
    Image.fromarray(np.zeros((33, 41, 3), np.uint8)).save(folder / "img.png")
    return _checkpoint(folder / "tiny.ckpt"), folder / "img.png"


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_predict_into_a_file_where_the_folder_belongs(tiny, tmp_path, capsys):
    from deeplab.predict import main

    ckpt, image = tiny
    (tmp_path / "out").write_text("a file")
    assert main([str(ckpt), str(image), "-o", str(tmp_path / "out")]) == 2
    assert _one_line(capsys) == f"error: {tmp_path / 'out'}: cannot write (it is a file; expected a folder)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("command", ["deeplab.evaluate", "export.to_onnx"])
def test_a_folder_where_the_output_file_belongs(tiny, tmp_path, capsys, command):
    import importlib

    ckpt, _ = tiny
    (tmp_path / "somedir").mkdir()
    main = importlib.import_module(command).main
    assert main([str(ckpt), "-o", str(tmp_path / "somedir")]) == 2
    assert _one_line(capsys) == f"error: {tmp_path / 'somedir'}: cannot write (it is a folder; expected a file name)"
    assert list((tmp_path / "somedir").iterdir()) == [] and len(list(tmp_path.iterdir())) == 1


@pytest.mark.slow
def test_ctrl_c_during_an_onnx_export_is_one_line_and_leaves_nothing(tmp_path):
    """A real SIGINT while the exporter runs (a ResNet-50 takes long enough to be caught in the middle)."""
    ckpt = _checkpoint(tmp_path / "r50.ckpt", backbone="resnet50")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "export.to_onnx", str(ckpt), "-o", str(out / "model.onnx")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # lines as they are written
    lines = []
    for line in proc.stdout:  # wait until the export itself has started
        lines.append(line)
        if line.startswith("exporting "):
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, "".join(lines) + rest
    assert rest.strip().splitlines() == [f"interrupted (SIGINT): {out / 'model.onnx'} not written (a file already "
                                         "there is unchanged); the same command starts over"]
    assert list(out.iterdir()) == []
