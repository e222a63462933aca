"""The prepared GPU check's logic that needs no GPU: arguments, the one-line exit without a GPU, every section in
its own interpreter under a hard time limit, a failed section failing the check, and the timing helper (a GPU
machine runs the rest). The check runs as a user runs it: `python -m export.gpu_check` in a fresh interpreter."""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime
import pytest
import torch

from export import gpu_check
from export.runners import format_precision, precision_groups

ROOT = Path(__file__).resolve().parents[1]


def run_check(args, tmp_path, timeout=600, **env):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "export.gpu_check", *args, "-o", str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True,
                          timeout=timeout)
    return proc, json.loads(out.read_text()) if out.is_file() else None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the check would really run")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "export.gpu_check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, "no CUDA GPU\n", "")
    assert list(tmp_path.iterdir()) == []


def test_arguments_and_where_the_json_goes(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = gpu_check.parse_args([])
    assert args.output == tmp_path / "gpu_check.json" and args.batches == [1, 8] and args.size == 513
    assert args.budget_s < 8 * 60  # sized to leave the 8-minute limit some room
    monkeypatch.delenv("OUT")
    assert gpu_check.parse_args([]).output == Path("runs/gpu_check.json")
    assert gpu_check.parse_args(["--backbone", "mobilenet_v3_large"]).backbone == "mobilenet_v3_large"  # registry
    assert gpu_check.parse_args(["--sections", "tensorrt"]).sections == ["tensorrt"]
    for bad in (["--train-batch", "1"], ["--batches", "0"], ["--backbone", "resnet_tiny"], ["--sections", "nope"],
                ["--budget-s", "0"], ["--section", "tensorrt"]):
        with pytest.raises(SystemExit) as e:
            gpu_check.parse_args(bad)
        assert e.value.code == 2


def test_fp16_training_config_is_valid_where_the_check_runs_it():
    """The training sections run deeplab's loop without Ray: their config holds deeplab's sections only, so it
    loads in a fresh interpreter (no cluster section registered) and fp16 passes (on a GPU: no cluster.use_gpu)."""
    code = ("import sys; from export import gpu_check; args = gpu_check.parse_args([]); "
            "cfg = gpu_check.train_config(args, 'fp16', True, 10); "
            "print(cfg.train.amp, cfg.data.crop_size, 'cluster' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "fp16 513 False\n", "")


def test_measure_times_every_repeat_after_the_warmup():
    calls, syncs = [], []
    stats = gpu_check.measure(lambda: (calls.append(1), time.sleep(0.002)), warmup=2, repeats=5,
                              sync=lambda: syncs.append(1))
    assert len(calls) == 7 and len(syncs) == 6  # one sync after the warm-up, one after each timed call
    assert stats["n"] == 5 and 2 <= stats["min_ms"] <= stats["median_ms"] < 1000


@pytest.mark.slow
def test_cpu_dry_run_in_a_fresh_interpreter_passes_every_section_a_cpu_can_run(tmp_path):
    """The same sections on the CPU with a tiny model, each in its own interpreter: the project's training loop
    (SyncBatchNorm converted, one evaluation, its checkpoint saved, loaded and resumed), each variant its own
    section. Only the GPU-only ones are skipped, each with its reason; none failed, so the exit code is 0."""
    proc, data = run_check(["--cpu-dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sections, skipped = data["sections"], data["skipped"]
    assert data["failed"] == {}
    assert set(sections) == {"environment", "inference_eager_fp32", "inference_eager_bf16", "inference_compile_bf16",
                             "training_bf16_channels_last", "training_fp32_nchw", "training_demo_step", "onnx_parity"}
    assert skipped == {"inference_eager_fp16": "cpu dry run: fp16 autocast is a GPU variant",
                       "training_fp16_channels_last": "cpu dry run: fp16 with GradScaler needs CUDA",
                       "tensorrt": "cpu dry run"}
    versions = sections["environment"]["versions"]
    assert (versions["torch"], versions["cuda"]) == (torch.__version__, torch.version.cuda)
    assert versions["onnxruntime"]["version"] == onnxruntime.__version__
    assert versions["onnxruntime"]["providers"] == onnxruntime.get_available_providers()
    assert sections["inference_eager_fp32"]["batch1"]["images_per_s"] > 0
    assert sections["inference_compile_bf16"]["batch1"]["images_per_s"] > 0
    for name in ("training_bf16_channels_last", "training_fp32_nchw"):
        t = sections[name]
        assert t["iterations"] == 2 and t["evaluations"] == 1 and 0 <= t["val_miou"] <= 1
        assert t["checkpoint"]["saved_iteration"] == 2 and t["checkpoint"]["resumed_to_iteration"] == 3
        assert t["world_size"] == 1 and "group of one runs it as BatchNorm" in t["sync_bn"]
    demo = sections["training_demo_step"]  # configs/demo.yaml's step, shrunk for the dry run
    assert (demo["iterations"] == 3 and demo["images_per_s_median"] > 0
            and demo["checkpoint"]["resumed_to_iteration"] == 4)
    assert (demo["backbone"], demo["batch"], demo["crop"]) == ("resnet_tiny", 2, 65)
    assert sections["training_bf16_channels_last"]["autocast"] == "bfloat16"
    assert sections["training_fp32_nchw"]["channels_last"] is False
    assert sections["onnx_parity"]["argmax_agreement"] > 0.99
    assert "no section failed" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json"]


def test_a_section_that_raises_or_crashes_fails_the_check_and_keeps_the_others(tmp_path):
    """One section raises (as torch.compile can), one's interpreter dies (as a TensorRT build can): both are
    recorded as failed with their reason, the sections after them still run, and the check exits 1."""
    sections = ["inference_eager_fp32", "inference_eager_bf16", "training_fp32_nchw"]
    proc, data = run_check(["--cpu-dry-run", "--sections", *sections], tmp_path,
                           GPU_CHECK_FAULT="inference_eager_fp32:crash,inference_eager_bf16:raise")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert data["failed"]["inference_eager_fp32"].startswith("its interpreter died of SIGABRT")
    assert data["failed"]["inference_eager_bf16"] == "RuntimeError: made to fail by GPU_CHECK_FAULT"
    assert set(data["failed"]) == {"inference_eager_fp32", "inference_eager_bf16"}
    assert set(data["sections"]) == {"training_fp32_nchw"}  # the one after them ran
    assert data["sections"]["training_fp32_nchw"]["iterations"] == 2
    assert "2 section(s) FAILED: inference_eager_fp32, inference_eager_bf16" in proc.stdout
    assert "made to fail by GPU_CHECK_FAULT" in proc.stderr  # the failed section's traceback, for the log


def test_a_hanging_section_is_killed_when_the_budget_runs_out_and_the_check_ends_in_time(tmp_path):
    """The budget holds while a section runs: a hang is killed at the budget (with what it started), the
    sections after it are not started, both recorded as failed, and the whole check ends near its budget."""
    t0 = time.monotonic()
    proc, data = run_check(["--cpu-dry-run", "--budget-s", "20", "--sections", "environment", "inference_eager_fp32"],
                           tmp_path, GPU_CHECK_FAULT="environment:hang")
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 20 <= took < 20 + 60  # the budget plus starting and ending the interpreters (on a busy machine)
    assert data["sections"] == {}
    assert re.fullmatch(r"killed after \d+s \(the time budget: \d+s\)", data["failed"]["environment"])
    assert data["failed"]["inference_eager_fp32"].startswith("not started: time budget")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_a_section_whose_package_is_not_installed_is_a_skip_not_a_failure(tmp_path):
    """The TensorRT section's own interpreter finds no tensorrt: an expected gap, recorded with its reason."""
    report = gpu_check.Report(tmp_path / "gpu_check.json", budget_s=120)
    report.run("tensorrt", 1, 120, ["--cpu-dry-run"])
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (data["skipped"], data["failed"], data["sections"]) == (
        {"tensorrt": "tensorrt is not installed here"}, {}, {})


def _children(pid: int) -> list:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_ctrl_c_stops_the_check_and_the_section_it_was_running(tmp_path):
    """A section runs in its own session (so a terminal's Ctrl-C reaches only the check): the check, stopped,
    kills the section's interpreter with it, says so in one line and exits 130."""
    out = tmp_path / "gpu_check.json"
    proc = subprocess.Popen([sys.executable, "-m", "export.gpu_check", "--cpu-dry-run", "--sections", "environment",
                             "-o", str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                             "GPU_CHECK_FAULT": "environment:hang"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (section := _children(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert section, "the section's interpreter never started"
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.startswith("interrupted (SIGINT): "), stderr
    assert f"{out} keeps every section finished" in stderr
    assert not Path(f"/proc/{section[0]}").exists()


def test_tf32_is_labelled_with_the_switches_torch_has():
    state = gpu_check.tf32_state()
    assert state["cudnn_allow_tf32"] == torch.backends.cudnn.allow_tf32
    assert state["matmul_allow_tf32"] == torch.backends.cuda.matmul.allow_tf32
    assert state["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert state["gpu_has_tf32"] == (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0))


def test_layer_precisions_are_read_from_the_engine_inspectors_json():
    """No TensorRT here: a JSON laid out as the inspector documents it (ProfilingVerbosity.DETAILED: LayerType
    and each output's Format/Datatype), and one listing names only (an engine built without DETAILED)."""
    detailed = {"Layers": [
        {"Name": "conv1", "LayerType": "CaskConvolution",
         "Outputs": [{"Name": "a", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}]},
        {"Name": "conv2", "LayerType": "CaskConvolution", "Outputs": [{"Format/Datatype": "Int8"}]},
        {"Name": "conv3", "LayerType": "CaskConvolution", "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
        {"Name": "resize", "LayerType": "Resize", "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
        {"Name": "odd", "LayerType": "Reformat", "Outputs": []}]}
    assert precision_groups(json.dumps(detailed)) == {"CaskConvolution": {"fp16": 1, "int8": 1, "fp32": 1},
                                                      "Resize": {"fp32": 1}, "Reformat": {"unknown": 1}}
    names_only = precision_groups(json.dumps({"Layers": ["conv1", "conv2"], "Bindings": ["images", "logits"]}))
    assert list(names_only) == ["unknown"] and list(names_only["unknown"].values()) == [2]
    assert [format_precision(t) for t in ("Half", "BF16", "Float", "INT32")] == ["fp16", "bf16", "fp32", "int32"]
