"""The training console (issue 11, point 8): the project's lines for a person; Ray's own in its logs."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cluster.console import ConsoleFilter, _Console

ROOT = Path(__file__).parents[1]
WORKER = {"actor_name": "RayTrainWorker", "pid": 11, "is_err": False}
CONTROLLER = {"actor_name": "TrainController", "pid": 12, "is_err": True}


def test_the_default_console_keeps_the_projects_lines_and_drops_rays():
    keep = ConsoleFilter().keep
    assert keep(WORKER, "iter 20/100  loss 0.9  lr 1.8e-02  7.1 img/s  eta 2m10s")
    assert keep(WORKER, "eval at iter 50: val mIoU 0.4123")
    assert keep({**WORKER, "is_err": True}, "warning: train.bn_momentum=0.0003 leaves 97% ...")
    assert keep(CONTROLLER, "Worker group failed: retrying from the latest checkpoint (1 of 3)")
    assert not keep(CONTROLLER, "[2026-12-02 01:17:15,337 E 32511 32566] core_worker.cc:2465: Actor with class "
                                "name: 'PreemptionWatcher' has constructor arguments in the object store")
    assert not keep({"actor_name": "PlacementGroupCleaner", "pid": 13}, "Exception in thread PlacementGroupCleaner:")
    assert not keep({"pid": "raylet"}, "some raylet line")
    assert not keep(WORKER, "")


def test_a_worker_traceback_is_left_to_the_driver_line_and_the_log_even_split_over_batches():
    keep = ConsoleFilter().keep
    first = ["Error in training function:", "Traceback (most recent call last):",
             '  File "deeplab/train_loop.py", line 354, in train_step']
    second = ['    raise FloatingPointError(f"loss is {loss_value}")', "FloatingPointError: loss is nan at iteration 3",
              "iter 4/6  loss 1.2  lr 1e-2  9 img/s  eta 0m01s"]
    assert [keep(WORKER, line) for line in first] == [False] * 3
    assert [keep(WORKER, line) for line in second] == [False, False, True]
    assert keep(CONTROLLER, "Error in control loop iteration: loss is nan") is False
    assert keep(CONTROLLER, '  File "controller.py", line 914') is False
    assert keep(CONTROLLER, "Training failed after 1 attempt") is True  # a new, unindented message


def test_every_forwarded_line_goes_to_the_log_and_verbose_shows_all(tmp_path):
    shown = []
    console = _Console(lambda batch, ignore_prefix: shown.append((batch["lines"], ignore_prefix)), verbose=False)
    console.open_log(str(tmp_path / "console.log"))
    console({**WORKER, "lines": ["Setting up process group for: env://", "iter 2/6  loss 1.3"]})
    console({**CONTROLLER, "lines": ["[2026-12-02 01:17:15,337 E 1 2] core_worker.cc:1: noise"]})
    console.open_log(None)
    console({**WORKER, "lines": ["a late line after the run"]})  # logged nowhere, still filtered
    assert shown == [(["Setting up process group for: env://", "iter 2/6  loss 1.3"], True),
                     (["a late line after the run"], True)]
    assert (tmp_path / "console.log").read_text().splitlines() == [
        "(RayTrainWorker pid=11) Setting up process group for: env://", "(RayTrainWorker pid=11) iter 2/6  loss 1.3",
        "(TrainController pid=12) [2026-12-02 01:17:15,337 E 1 2] core_worker.cc:1: noise"]
    console.verbose = True
    console({**CONTROLLER, "lines": ["[2026-12-02 01:17:15,337 E 1 2] core_worker.cc:1: noise"]})
    assert shown[-1] == (["[2026-12-02 01:17:15,337 E 1 2] core_worker.cc:1: noise"], False)


@pytest.mark.slow
def test_a_training_run_prints_progress_evaluations_and_the_summary_only(tmp_path):
    """A real 2-worker run on a local Ray: Ray Train's INFO lines ("Setting up process group", "Moving model to
    device", "Reporting training result") and Ray Core's C++ lines stay off the console, in RUN_DIR/logs."""
    # Ray's socket paths must stay under 108 bytes: a short folder of its own, not one under pytest's tmp_path
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "cluster.train", "--config", "configs/demo.yaml", "--storage-path", str(tmp_path),
           "--name", "console", "--set", "model.backbone=resnet_tiny", "--set", "model.aspp_channels=16",
           "--set", "data.crop_size=65", "--set", "data.synthetic_val=2", "--set", "train.max_iterations=4",
           "--set", "train.eval_interval=2", "--set", "train.log_interval=2", "--set", "cluster.address=local"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    for line in ("iter 2/4", "iter 4/4", "eval at iter 2: val mIoU", "eval at iter 4: val mIoU", "best checkpoint:"):
        assert line in console
    for noise in ("Setting up process group", "Moving model to device", "Reporting training result",
                  "core_worker.cc", "RayTrainWorker pid=", "Started training worker group"):
        assert noise not in console, noise
    assert len([line for line in console.splitlines() if line.strip()]) <= 16
    logs = tmp_path / "console" / "logs"
    assert "iter 4/4" in (logs / "console.log").read_text()
    ray_train = " ".join(p.read_text() for p in (logs / "ray_train").glob("*.log"))
    assert "Setting up process group" in ray_train and "Reporting training result" in ray_train
