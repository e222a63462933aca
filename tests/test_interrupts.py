"""Stop a command at a point where it is working, with SIGINT (Ctrl-C) or SIGTERM (a scheduler, `kill`,
`timeout`), as a user does: each command in a fresh interpreter started with SIGINT ignored (what a background
job of a non-interactive shell inherits), then the same command again. Every stop must end with exit 130 or
143 and one line saying what was kept and what a rerun does; no output half-written (no file at the output's
name, no temporary file left); everything the command started (Ray's processes) gone. `cluster.segment` is
stopped before Ray starts and mid-batch with each signal, then rerun to the end: its masks equal an
uninterrupted run's. The default console also leaves out the Ray lines a user cannot act on (kept under
--verbose)."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab import build_model, save_checkpoint
from deeplab.config import DataConfig, ExperimentConfig, ModelConfig, to_plain
from inference_files import photo, read_png

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
IMAGES = 48
PREDICT_IMAGES = 500  # deeplab.predict: one image after another in the command's own process
# start the command with SIGINT ignored, as `cmd &` in a script does; exec keeps the ignored disposition
IGNORING_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                   "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
TEMP_FILE = re.compile(r"^\..*(\.tmp\d*|\.\d+\.tmp|\.tmp\d+\.\w+)$|^\.to_openvino\.")
ACTOR_ARGUMENTS_LINE = "has constructor arguments in the object store"  # Ray Data's actors, see cluster/console.py
SERVE_SHUTDOWN_LINE = "ServeController.graceful_shutdown failed"
# Ray's temporary folder of this module's commands: the cluster a command starts is its own, and no address
# that another `ray start` on this machine recorded in /tmp/ray is joined (short: Ray's socket paths live there)
RAY_TMPDIR = tempfile.mkdtemp(prefix="ri", dir="/tmp")


ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": RAY_TMPDIR}


@pytest.fixture(scope="module", autouse=True)
def ray_tmpdir():
    yield
    shutil.rmtree(RAY_TMPDIR, ignore_errors=True)


def descendants(pid: int) -> set:
    """Every live process below ``pid`` (Ray's GCS, raylet, workers, ...), from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Command:
    """One run of a command in a fresh interpreter started with SIGINT ignored; its stdout and stderr lines
    are collected as they come."""

    def __init__(self, *argv):
        self.proc = subprocess.Popen([sys.executable, "-c", IGNORING_SIGINT, *map(str, argv)], cwd=ROOT,
                                     env=ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.stdout, self.stderr = [], []
        self.readers = [threading.Thread(target=lambda s=s, f=f: s.extend(f), daemon=True)
                        for s, f in ((self.stdout, self.proc.stdout), (self.stderr, self.proc.stderr))]
        for reader in self.readers:
            reader.start()
        self.started = set()

    @property
    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        """The first output line matching ``pattern`` (the command still running)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.stdout + self.stderr:
                match = re.search(pattern, line)
                if match:
                    return match
            assert self.proc.poll() is None, \
                f"ended ({self.proc.returncode}) before {pattern!r}:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout}s:\n{self.output[-4000:]}"
            time.sleep(0.05)

    def stop(self, sig: int, timeout: float = 180) -> int:
        self.started = descendants(self.proc.pid)
        self.proc.send_signal(sig)
        return self.finish(timeout)

    def finish(self, timeout: float = 600) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        for reader in self.readers:
            reader.join(timeout=60)
        return code

    def interrupted_line(self, sig: int) -> str:
        """The one line a stop prints: exactly one, and no traceback."""
        lines = [line.rstrip("\n") for line in self.stderr if line.startswith("interrupted (")]
        assert len(lines) == 1, self.output[-4000:]
        assert lines[0].startswith(f"interrupted ({signal.Signals(sig).name}): "), lines
        assert "Traceback" not in self.output, self.output[-4000:]
        return lines[0].split(": ", 1)[1]

    def assert_all_stopped(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while any(alive(pid) for pid in self.started) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [pid for pid in self.started if alive(pid)]
        assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in left if alive(pid)]


def temp_files(folder: Path) -> list:
    return [str(p) for p in folder.rglob(".*") if TEMP_FILE.match(p.name)] if folder.exists() else []


def expected_code(sig: int) -> int:
    return 128 + sig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint whose masks vary across an image (random BatchNorm affine) with its experiment's data
    section (synthetic), and a folder of IMAGES small photos."""
    folder = tmp_path_factory.mktemp("interrupts")
    torch.manual_seed(0)
    exp = ExperimentConfig(model=ModelConfig(backbone="resnet_tiny", num_classes=5, aspp_channels=16),
                           data=DataConfig(synthetic_size=65, synthetic_val=3000, synthetic_classes=5, crop_size=65,
                                           loader_workers=0))
    model = build_model(exp.model).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.5)
    ckpt = save_checkpoint(folder / "tiny.ckpt", model, exp)
    photos = folder / "photos"
    photos.mkdir()
    for i in range(IMAGES):
        Image.fromarray(photo((48, 64), seed=i)).save(photos / f"img{i:02d}.png")
    return {"ckpt": ckpt, "photos": photos, "folder": folder, "data": to_plain(exp.data)}


# --------------------------------------------------------------------------------------------- cluster.segment
def segment(files, out, *extra) -> Command:
    """A local Ray cluster of the command's own (no cluster.address): Ray and everything it starts are the
    command's to stop. One actor, one image per call: slow enough to be stopped mid-batch."""
    return Command("-m", "cluster.segment", files["ckpt"], files["photos"], "-o", out, "--workers", "1",
                   "--batch-size", "1", "--set", "segment.progress_interval_s=0.2", *extra)


def masks(out: Path) -> dict:
    return {p.name: read_png(p) for p in sorted(out.glob("img*.png"))}


def ok_records(out: Path) -> int:
    records = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["path"]] = record["status"]
    return sum(status == "ok" for status in records.values())


def test_segment_stopped_before_ray_and_mid_batch_then_rerun_gives_the_same_masks(files, tmp_path):
    reference = segment(files, tmp_path / "reference", "--verbose")
    assert reference.finish() == 0, reference.output[-4000:]
    expected = masks(tmp_path / "reference")
    assert len(expected) == IMAGES
    assert ACTOR_ARGUMENTS_LINE in reference.output  # --verbose keeps Ray's line (this Ray prints it)

    out = tmp_path / "out"
    for sig in (signal.SIGTERM, signal.SIGINT):  # before Ray starts: the model was read, nothing else done
        run = segment(files, out)
        run.wait_for(r"^model: ")
        assert run.stop(sig) == expected_code(sig), run.output[-4000:]
        assert run.interrupted_line(sig) == (f"{out} is as it was (nothing segmented by this run yet); the same "
                                             "command starts again")
        assert not list(out.rglob("*.png")) and temp_files(out) == []
        run.assert_all_stopped()

    done = 0
    for sig in (signal.SIGINT, signal.SIGTERM):  # mid-batch: some images segmented, not all
        run = segment(files, out)
        first = run.wait_for(r"^(\d+) images: (\d+) to segment, (\d+) already done")
        assert first.groups() == (str(IMAGES), str(IMAGES - done), str(done)), run.output[-4000:]
        run.wait_for(r"^segment: [1-9]\d*/\d+ images")
        assert run.stop(sig) == expected_code(sig), run.output[-4000:]
        line = run.interrupted_line(sig)
        kept = re.fullmatch(rf"(\d+) of {IMAGES} images segmented in {re.escape(str(out))} \(manifest\.jsonl\); "
                            r"the same command skips them and segments the other (\d+)", line)
        assert kept, line
        assert int(kept[1]) == ok_records(out) and int(kept[1]) + int(kept[2]) == IMAGES
        assert done < int(kept[1]) < IMAGES, line  # stopped while working, after this run had written some
        done = int(kept[1])
        assert temp_files(out) == [] and ACTOR_ARGUMENTS_LINE not in run.output
        run.assert_all_stopped()

    rerun = segment(files, out)
    assert rerun.finish() == 0, rerun.output[-4000:]
    assert re.search(rf"^{IMAGES} images: {IMAGES - done} to segment, {done} already done", rerun.output, re.M)
    assert ACTOR_ARGUMENTS_LINE not in rerun.output
    got = masks(out)
    assert got.keys() == expected.keys()
    for name, mask in expected.items():
        np.testing.assert_array_equal(got[name], mask, err_msg=name)


# --------------------------------------------------------------------------------- export, bench, evaluate
def test_to_onnx_stopped_while_exporting_leaves_the_old_file(files, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an older export")
    run = Command("-m", "export.to_onnx", files["ckpt"], "-o", out, "--output-stride", "16")
    run.wait_for(r"^exporting resnet_tiny")
    assert run.stop(signal.SIGINT) == 130, run.output[-4000:]
    assert run.interrupted_line(signal.SIGINT) == f"{out} not written (a file already there is unchanged); the same " \
                                                  "command starts over"
    assert out.read_bytes() == b"an older export" and temp_files(tmp_path) == []


def test_to_openvino_stopped_while_converting(files, tmp_path):
    out = tmp_path / "model.xml"
    run = Command("-m", "export.to_openvino", files["ckpt"], "-o", out, "--output-stride", "16")
    run.wait_for(r"^exporting resnet_tiny")  # a checkpoint goes to ONNX first, in a temporary folder
    assert run.stop(signal.SIGTERM) == 143, run.output[-4000:]
    assert run.interrupted_line(signal.SIGTERM) == f"{out} not written (a file already there is unchanged); the " \
                                                   "same command starts over"
    assert sorted(p.name for p in tmp_path.iterdir()) == [] and temp_files(tmp_path) == []


def test_bench_stopped_while_exporting(files, tmp_path):
    out = tmp_path / "bench"
    run = Command("export/bench.py", "--checkpoint", files["ckpt"], "--size", "65", "--repeats", "1",
                  "--accuracy-images", "0", "--calib-images", "2", "--out", out)
    run.wait_for(r"^exporting .*model_os\d+\.onnx")
    assert run.stop(signal.SIGTERM) == 143, run.output[-4000:]
    line = run.interrupted_line(signal.SIGTERM)
    assert line == (f"no figures written ({out / 'bench.json'} is as it was; model files finished in {out} are "
                    "whole); the same command measures everything again")
    assert not (out / "bench.json").exists() and temp_files(out) == []


def test_evaluate_stopped_while_evaluating(files, tmp_path):
    out = tmp_path / "eval.json"
    run = Command("-m", "deeplab.evaluate", files["ckpt"], "-o", out, "--workers", "0")
    run.wait_for(r"^evaluating .* \(3000 images\)")
    assert run.stop(signal.SIGINT) == 130, run.output[-4000:]
    assert run.interrupted_line(signal.SIGINT) == (f"no results written ({out} is as it was); the same command "
                                                   "evaluates again from the first image")
    assert not out.exists() and temp_files(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_predict_stopped_mid_folder_counts_exactly_the_images_whose_pngs_are_there(files, tmp_path, sig):
    """The line's count is the images with all three PNGs in OUT (written and counted in one stops_held block),
    none with only some of them, no temporary file; a stop lands anywhere in the loop."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(PREDICT_IMAGES):  # enough that the command is still working when it is stopped
        Image.fromarray(photo((48, 64), seed=i)).save(photos / f"p{i:03d}.png")
    out = tmp_path / "out"
    run = Command("-m", "deeplab.predict", files["ckpt"], photos, "-o", out)
    run.wait_for(r"p\d{3}\.png -> ")
    time.sleep(random.uniform(0, 0.3))  # anywhere in an image's read, model, writes or line
    assert run.stop(sig) == expected_code(sig), run.output[-4000:]
    kept = re.fullmatch(rf"the PNGs of (\d+) of {PREDICT_IMAGES} images are in {re.escape(str(out))} \(each file "
                        r"whole\); the same command writes them all again", run.interrupted_line(sig))
    assert kept, run.interrupted_line(sig)
    stems = {}
    for png in out.glob("*.png"):
        stem = png.name.removesuffix(".png").removesuffix("_color").removesuffix("_overlay")
        stems[stem] = stems.get(stem, 0) + 1
    assert set(stems.values()) <= {3}, stems  # all three or none
    assert 0 < int(kept[1]) == len(stems) < PREDICT_IMAGES and temp_files(out) == []


# ------------------------------------------------------------------------------------------------ cluster.serve
def get_json(url: str):
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("sig,verbose", [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_serve_stopped_while_serving(files, sig, verbose):
    """Also: /info carries the checkpoint's data section (as an export of it does), and Serve's own shutdown
    line is off the default console, kept under --verbose."""
    from cluster.ray_session import free_port

    port = free_port()
    run = Command("-m", "cluster.serve", files["ckpt"], "--port", port, "--set", "serve.metrics_port=null",
                  *(["--verbose"] if verbose else []))
    run.wait_for(r"^serving ")
    url = f"http://127.0.0.1:{port}"
    assert get_json(f"{url}/info")["data_config"] == files["data"]
    assert run.stop(sig) == expected_code(sig), run.output[-4000:]
    assert run.interrupted_line(sig) == (f"the endpoint at {url} stopped (Serve shut down); nothing is written; "
                                         "the same command serves again")
    run.assert_all_stopped()
    assert (SERVE_SHUTDOWN_LINE in run.output) == verbose, run.output[-4000:]
