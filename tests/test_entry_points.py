"""Every command a user can type (tests/entry_points.py), run as a user runs it: `python ...` in a fresh
interpreter, from the repository root, with no conftest import in it. Each answers --help; the one-process
commands also make one tiny real run here, along the hand-offs (a checkpoint -> ONNX -> IR -> evaluate/predict),
each file made once for the module. The Ray commands' real runs are costly (a Ray cluster each) and live in the
test files named in RUN_ELSEWHERE, which this file checks still run them."""
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_trees import make_voc
from entry_points import COMMANDS
from inference_files import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("deeplab", "export", "cluster", "tuning")
# Where the commands that need a Ray cluster (or a torchvision file) make their real run in a fresh interpreter.
RUN_ELSEWHERE = {
    "deeplab.import_torchvision": "test_import_torchvision.py",
    "cluster.train": "test_console.py",
    "cluster.demo": "test_visualize.py",
    "cluster.segment": "test_segment_ray.py",
    "cluster.serve": "test_serve_ray.py",
    "tuning.search_rates": "test_tuning_resume.py",
    "cluster.down": "test_ray_up_onprem.py",
}
HELP_ONLY = {  # why there is no tiny real run of these anywhere
    "cluster.bench": "a benchmark of Ray Train's overhead: minutes of Ray and training by design",
    "cluster.bench_serve": "a benchmark of Serve and Ray Data: a cluster, a server and a segment run by design",
    "cluster.spot_watch": "polls EC2's metadata address forever; tests/test_spot_watch.py runs its loop against "
                          "a loopback server in-process",
}
TINY = ["--set", "model.backbone=resnet_tiny", "--set", "model.aspp_channels=16"]
SYNTHETIC = ["--format", "synthetic", "--set", "data.synthetic_classes=5", "--set", "data.synthetic_size=49",
             "--set", "data.synthetic_val=2"]


def python(argv: list, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def command_modules() -> set:
    """Every module of the packages that runs as a command (a ``__main__`` guard or a package __main__)."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            if path.name == "__main__.py" or re.search(r"^if __name__ == .__main__.:", text, re.M):
                rel = path.relative_to(ROOT)
                parts = rel.with_suffix("").parts
                found.add(".".join(parts[:-1] if path.name == "__main__.py" else parts))
    return found


def test_the_list_of_commands_is_every_module_that_runs_as_one():
    listed = {name.replace("/", ".").removesuffix(".py") for name in COMMANDS}
    assert command_modules() == listed
    assert set(RUN_ELSEWHERE) | set(HELP_ONLY) | set(REAL_RUNS) == set(COMMANDS)


def test_every_command_answers_help_in_a_fresh_interpreter():
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = dict(zip(COMMANDS, pool.map(lambda argv: python([*argv, "--help"], timeout=240), COMMANDS.values())))
    for name, proc in done.items():
        assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
        assert proc.stdout.startswith("usage: "), name
        assert "Traceback" not in proc.stderr, f"{name}: {proc.stderr[-2000:]}"


@pytest.mark.parametrize("name,test_file", sorted(RUN_ELSEWHERE.items()))
def test_the_ray_commands_real_runs_are_still_there(name, test_file):
    text = (ROOT / "tests" / test_file).read_text()
    assert f'"-m", "{name}"' in text and "--help" not in text.split(f'"-m", "{name}"')[1][:40]


# ------------------------------------------------------------------------------------------ tiny real runs
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """What the tiny runs share: a checkpoint, a photo, a VOC tree, and the model files the export commands make
    (made once, by those commands, in the order a user would)."""
    root = tmp_path_factory.mktemp("entry_points")
    made = {"root": root, "ckpt": tiny_checkpoint(root / "model.ckpt", num_classes=5), "image": root / "photo.jpg"}
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (41, 53, 3), dtype=np.uint8)).save(made["image"])
    make_voc(root / "voc")
    made["voc"] = root / "voc" / "VOCdevkit" / "VOC2012"
    made["onnx"], made["xml"] = root / "model.onnx", root / "model.xml"
    made["runs"] = {"export.to_onnx": python(["-m", "export.to_onnx", str(made["ckpt"]), "-o", str(made["onnx"])]),
                    "export.to_openvino": None}
    made["runs"]["export.to_openvino"] = python(["-m", "export.to_openvino", str(made["onnx"]), "-o", str(made["xml"])])
    return made


def run_to_onnx(f):
    proc = f["runs"]["export.to_onnx"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f["onnx"].is_file()


def run_to_openvino(f):
    proc = f["runs"]["export.to_openvino"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f["xml"].is_file() and f["xml"].with_suffix(".bin").is_file()


def run_to_tensorrt(f):
    """No GPU or TensorRT here: the CPU-side file is made, then one line and exit 2 (docs/design.md)."""
    out = f["root"] / "trt" / "model.engine"
    proc = python(["-m", "export.to_tensorrt", str(f["onnx"]), "--precision", "fp16", "-o", str(out)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: cannot build a TensorRT engine here") and proc.stderr.count("\n") == 1
    assert not out.exists()


def run_deeplab_evaluate(f):
    out = f["root"] / "eval_ckpt.json"
    proc = python(["-m", "deeplab.evaluate", str(f["ckpt"]), *SYNTHETIC, "-o", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 0 <= json.loads(out.read_text())["miou"] <= 1


def run_export_evaluate(f):
    out = f["root"] / "eval_onnx.json"
    proc = python(["-m", "export.evaluate", str(f["onnx"]), *SYNTHETIC, "-o", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 0 <= json.loads(out.read_text())["miou"] <= 1


def _predicted(folder: Path) -> list:
    return sorted(p.name for p in folder.rglob("*.png"))


def run_deeplab_predict(f):
    out = f["root"] / "pred_ckpt"
    proc = python(["-m", "deeplab.predict", str(f["ckpt"]), str(f["image"]), "-o", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "photo.png" in _predicted(out)


def run_export_predict(f):
    out = f["root"] / "pred_ir"
    proc = python(["-m", "export.predict", str(f["xml"]), str(f["image"]), "-o", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "photo.png" in _predicted(out)


def run_data_check(f):
    proc = python(["-m", "deeplab.data", "check", "--format", "voc", "--root", str(f["voc"]), "--split", "train"])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def run_data_bench(f):
    proc = python(["-m", "deeplab.data.bench", "--images", "2", "--rounds", "1", "--synthetic-sizes", "33",
                   "--crop", "33"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "images/s" in proc.stdout


def run_bench_model(f):
    proc = python(["-m", "deeplab.bench_model", "--backbone", "resnet_tiny", "--set", "model.aspp_channels=16",
                   "--size", "33", "--repeats", "1", "--threads", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]


def run_bench(f):
    out = f["root"] / "bench"
    proc = python(["export/bench.py", "--checkpoint", str(f["ckpt"]), "--size", "33", "--repeats", "1",
                   "--accuracy-images", "0", "--threads", "1", "--backends", "torch_fp32,ort_cpu_fp32", "--out",
                   str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"torch_fp32", "ort_cpu_fp32"}


def run_gpu_check(f):
    """The dry run of two sections (the whole dry run is tests/test_gpu_check.py's)."""
    out = f["root"] / "gpu_check.json"
    proc = python(["-m", "export.gpu_check", "--cpu-dry-run", "--sections", "environment", "inference_eager_fp32",
                   "-o", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["sections"]) == {"environment", "inference_eager_fp32"} and data["failed"] == {}


def run_check_config(f):
    proc = python(["-m", "cluster.check_config", "ray_cluster.yaml"])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def run_receptive(f):
    """A 129 crop at output stride 16 leaves a 9x9 map: a rate of 12 or more keeps only the centre tap (1/9)."""
    proc = python(["-m", "deeplab.receptive", "--crop", "129", "--output-stride", "16"])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "feature map 9x9" in proc.stdout
    assert re.search(r"rate\s+12:\s+11\.1%", proc.stdout) and re.search(r"rate\s+18:\s+11\.1%", proc.stdout)


REAL_RUNS = {"export.to_onnx": run_to_onnx, "export.to_openvino": run_to_openvino,
             "export.to_tensorrt": run_to_tensorrt, "deeplab.evaluate": run_deeplab_evaluate,
             "export.evaluate": run_export_evaluate, "deeplab.predict": run_deeplab_predict,
             "export.predict": run_export_predict, "deeplab.data": run_data_check, "deeplab.data.bench": run_data_bench,
             "deeplab.bench_model": run_bench_model, "export/bench.py": run_bench, "export.gpu_check": run_gpu_check,
             "cluster.check_config": run_check_config, "deeplab.receptive": run_receptive}


@pytest.mark.parametrize("name", list(REAL_RUNS))
def test_one_tiny_real_run_in_a_fresh_interpreter(name, files):
    REAL_RUNS[name](files)
