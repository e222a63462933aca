"""The prepared GPU check's logic that needs no GPU: arguments, the one-line exit without a GPU, the JSON
report written section by section within a time budget, and the timing helper (a GPU machine runs the rest)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from export import gpu_check

ROOT = Path(__file__).resolve().parents[1]


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
    for bad in (["--train-batch", "1"], ["--batches", "0"], ["--backbone", "resnet_tiny"]):
        with pytest.raises(SystemExit) as e:
            gpu_check.parse_args(bad)
        assert e.value.code == 2


def test_report_keeps_every_section_it_finished(tmp_path):
    report = gpu_check.Report(tmp_path / "out" / "gpu_check.json", budget_s=30)
    report.add("environment", {"gpu": "none"})
    report.run("fast", 1, lambda: {"value": 1})
    report.run("broken", 1, lambda: 1 / 0)
    report.run("too_long", 3600, lambda: pytest.fail("a section over the budget must not start"))
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert data["sections"] == {"environment": {"gpu": "none"}, "fast": {"value": 1}}
    assert data["skipped"]["broken"].startswith("failed: ZeroDivisionError")
    assert data["skipped"]["too_long"].startswith("time budget:")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json"]


def test_measure_times_every_repeat_after_the_warmup():
    calls, syncs = [], []
    stats = gpu_check.measure(lambda: (calls.append(1), time.sleep(0.002)), warmup=2, repeats=5,
                              sync=lambda: syncs.append(1))
    assert len(calls) == 7 and len(syncs) == 6  # one sync after the warm-up, one after each timed call
    assert stats["n"] == 5 and 2 <= stats["min_ms"] <= stats["median_ms"] < 1000


@pytest.mark.slow
def test_cpu_dry_run_runs_every_section_and_a_compile_failure_keeps_the_eager_figures(tmp_path, monkeypatch, capsys):
    """The same sections on the CPU with a tiny model: the project's training loop (SyncBatchNorm converted, one
    evaluation, its checkpoint saved, loaded and resumed), each variant its own section. torch.compile is made
    to fail (as inductor can on a new GPU): the eager figures measured before it stay in the JSON."""
    def broken_compile(*args, **kwargs):
        raise RuntimeError("inductor failed on this GPU")

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--cpu-dry-run", "-o", str(out)]) == 0
    data = json.loads(out.read_text())
    sections, skipped = data["sections"], data["skipped"]
    assert set(sections) == {"environment", "inference_eager_fp32", "inference_eager_bf16",
                             "training_bf16_channels_last", "training_fp32_nchw", "training_demo_step", "onnx_parity"}
    assert skipped["inference_compile_bf16"] == "failed: RuntimeError: inductor failed on this GPU"
    assert set(skipped) == {"inference_compile_bf16", "inference_eager_fp16", "training_fp16_channels_last", "tensorrt"}
    assert sections["inference_eager_fp32"]["batch1"]["images_per_s"] > 0
    for name in ("training_bf16_channels_last", "training_fp32_nchw"):
        t = sections[name]
        assert t["iterations"] == 2 and t["evaluations"] == 1 and 0 <= t["val_miou"] <= 1
        assert t["checkpoint"]["saved_iteration"] == 2 and t["checkpoint"]["resumed_to_iteration"] == 3
        assert t["world_size"] == 1 and "group of one runs it as BatchNorm" in t["sync_bn"]
    demo = sections["training_demo_step"]  # configs/demo.yaml's step, shrunk for the dry run
    assert demo["iterations"] == 3 and demo["images_per_s_median"] > 0 and demo["checkpoint"]["resumed_to_iteration"] == 4
    assert (demo["backbone"], demo["batch"], demo["crop"]) == ("resnet_tiny", 2, 65)
    assert sections["training_bf16_channels_last"]["autocast"] == "bfloat16"
    assert sections["training_fp32_nchw"]["channels_last"] is False
    assert sections["onnx_parity"]["argmax_agreement"] > 0.99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json"]


def test_tf32_is_labelled_with_the_switches_torch_has():
    state = gpu_check.tf32_state()
    assert state["cudnn_allow_tf32"] == torch.backends.cudnn.allow_tf32
    assert state["matmul_allow_tf32"] == torch.backends.cuda.matmul.allow_tf32
    assert state["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert state["gpu_has_tf32"] == (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0))
