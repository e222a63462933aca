"""Install paths: onnxruntime and onnxruntime-gpu ship the same module and cannot coexist, so the CPU and GPU
runtimes are separate extras, and each extra the suite uses resolves against the installed environment."""
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements) -> set:
    import re

    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_cpu_and_gpu_runtimes_are_separate_extras():
    base, extras = _names(PROJECT["dependencies"]), PROJECT["optional-dependencies"]
    assert not base & {"onnxruntime", "onnxruntime-gpu"}  # the base install picks neither
    assert {"onnxruntime", "openvino", "nncf"} <= _names(extras["cpu"])
    assert "onnxruntime-gpu" in _names(extras["gpu"]) and "onnxruntime" not in _names(extras["gpu"])
    assert "deeplabv3-ray[cpu]" in extras["dev"]  # the tests cover OpenVINO and NNCF
    torch = [r for r in PROJECT["dependencies"] if r.startswith("torch")]
    assert torch == ["torch>=2.4"]  # a range: GPU users keep their CUDA build, CI installs torch==2.13.0 first


def test_gpu_extra_pins_the_versions_that_load_together_and_the_readme_names_them():
    """An open range let tensorrt resolve to 11, which the onnxruntime-gpu of the day could not load: the gpu
    extra pins one set (onnxruntime-gpu 1.22 <-> TensorRT 10.9, ModelOpt requiring onnxruntime-gpu ~=1.22.0)."""
    pins = dict(r.replace("[onnx]", "").split("==") for r in PROJECT["optional-dependencies"]["gpu"])
    assert set(pins) == {"onnxruntime-gpu", "tensorrt", "nvidia-modelopt"}
    assert pins["tensorrt"].startswith("10.") and pins["onnxruntime-gpu"].startswith("1.22.")
    stated = (f"onnxruntime-gpu {pins['onnxruntime-gpu']}, TensorRT {pins['tensorrt']}, "
              f"ModelOpt {pins['nvidia-modelopt']}")
    assert stated in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("extra", ["cpu", "dev"])
def test_extra_resolves_offline_in_this_environment(extra):
    """pip's resolver, with no index, must find every requirement of the extra already installed here."""
    import importlib.util

    if importlib.util.find_spec("setuptools") is None:  # the build backend, used without isolation (no index)
        pytest.skip("setuptools is not installed in this environment: pip cannot build the project offline")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                           "--no-input", "-e", f".[{extra}]"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if "No module named pip" in proc.stderr:
        pytest.skip("pip is not installed in this environment")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Would install deeplabv3-ray" in proc.stdout


def test_gpu_extra_resolution_cannot_run_here():
    pytest.skip("the gpu extra cannot be resolved on this machine: tensorrt's libraries are wheel stubs that "
                "download from NVIDIA's own index during resolution, which a PyPI-only machine cannot reach; "
                "onnxruntime-gpu + nvidia-modelopt[onnx] resolved with pip --dry-run --ignore-installed pull no "
                "CPU onnxruntime (checked by hand, see docs/export.md)")
