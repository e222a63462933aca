"""Interrupt a search with Ctrl-C (SIGINT) after its first trial finished, run the same command again, and the
search continues: the finished trial is kept as it was and not run again. Both runs are real subprocesses,
each with its own local Ray cluster, exactly as a user would type them."""
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _config(storage: Path, output: Path) -> dict:
    return {
        "model": {"backbone": "resnet_tiny", "num_classes": 4, "aspp_channels": 16, "output_stride": 16},
        "data": {"dataset": "synthetic", "synthetic_size": 65, "synthetic_train": 16, "synthetic_val": 2,
                 "synthetic_classes": 4, "loader_workers": 0, "val_size": 65, "crop_size": 65},
        "train": {"batch_size": 2, "max_iterations": 8, "eval_interval": 4, "log_interval": 4, "lr": 0.1,
                  "amp": "off", "channels_last": False},
        "cluster": {"num_workers": 1, "cpus_per_worker": 1, "storage_path": str(storage), "max_failures": 0,
                    "collective_timeout_s": 60},
        "tune": {"name": "resume", "scheduler": "fifo", "workers_per_trial": 1, "max_concurrent": 1,
                 "output": str(output),
                 "space": {"multi_grid": [[1, 2, 4], [2, 2, 2]], "aspp_rates": [[1, 2, 3]], "crop_size": [65]}},
    }


def _rows(search_dir: Path) -> dict:
    with open(search_dir / "results.csv") as f:
        return {r["trial_id"]: r for r in csv.DictReader(f)}


def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path):
    config = tmp_path / "search.yaml"
    output = tmp_path / "best.ckpt"
    config.write_text(yaml.safe_dump(_config(tmp_path / "runs", output)))
    search_dir = tmp_path / "runs" / "resume"
    command = [sys.executable, "-m", "tuning.search_rates", "--config", str(config)]
    # its own Ray temp folder: a cluster another test records in the default one (/tmp/ray) is never joined
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are limited to 107 bytes
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp}

    # first run: Ctrl-C as soon as one trial has finished
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True)
    reader.start()
    finished_id = None
    deadline = time.monotonic() + 400
    while finished_id is None and time.monotonic() < deadline and first.poll() is None:
        found = [m.group(1) for m in map(re.compile(r"\[search\] trial (\S+) finished").search, list(lines)) if m]
        finished_id = found[0] if found else None
        time.sleep(0.5)
    try:
        assert finished_id, "no trial finished in time:\n" + "".join(lines[-60:])
        first.send_signal(signal.SIGINT)
        first.wait(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    reader.join(timeout=10)
    text = "".join(lines)
    if first.returncode == 0:
        pytest.fail("the first run finished every trial before Ctrl-C could interrupt it:\n" + text[-3000:])
    assert first.returncode == 130, text[-3000:]
    assert "interrupted (SIGINT): 1 of 2 trials unfinished" in text and "the same command" in text
    # the console is the project's: no Tune box, no trial's worker lines, no advice to call Tuner.restore
    for noise in ("Configuration for experiment", "(RayTrainWorker", "Tuner.restore", "Trials did not complete"):
        assert noise not in text, noise
    assert "(RayTrainWorker" in (search_dir / "logs" / "console.log").read_text()  # kept in the search's log
    assert not output.exists()  # no best.ckpt from half a search
    kept = (search_dir / finished_id / "result.json").read_text()
    before = _rows(search_dir)
    assert before[finished_id]["status"] == "finished" and before[finished_id]["iterations"] == "8"

    # second run: the very same command continues the search
    second = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=400)
    assert second.returncode == 0, second.stdout[-3000:]
    assert f"[search] resuming {search_dir}" in second.stdout
    assert f"trial {finished_id} finished" not in second.stdout  # not run again...
    assert (search_dir / finished_id / "result.json").read_text() == kept  # ...and its results untouched
    after = _rows(search_dir)
    assert set(after) == set(before) and len(after) == 2
    assert after[finished_id]["miou"] == before[finished_id]["miou"]
    other = next(t for t in after if t != finished_id)
    assert after[other]["status"] == "finished" and after[other]["iterations"] == "8"
    assert f"trial {other} finished" in second.stdout
    assert second.stdout.strip().splitlines()[-1] == str(output) and output.exists()
    shutil.rmtree(ray_tmp, ignore_errors=True)
