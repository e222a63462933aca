"""Stop `python -m cluster.train` at any moment, run the same command again: nothing finished is lost or redone.

One run is stopped at a point after another and run again each time, as a user does: before Ray starts (SIGINT
inherited as ignored, as in a background job), during the first iteration (SIGTERM), during an evaluation, in
the middle of a checkpoint write, and just after a checkpoint is written whole but before Ray recorded it (the
case of issue 30). Each stop must exit 130 (SIGINT) or 143 (SIGTERM) with one line saying what was kept, leave
no Ray process and no half-written file; each rerun must resume from the newest complete checkpoint on disk
(never an older one); the last one must end with the same weights and metrics as an uninterrupted run with the
same seed. A stop lands exactly at its point through the test-only pause (deeplab.pause): the process prints a
marker there and waits for the signal.

Every command is a fresh interpreter with its own local Ray (in its own temporary folder, to find its processes).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_ITERATIONS = 12
SETTINGS = [  # resnet_tiny on 65 px synthetic crops, 2 workers (synchronized BatchNorm), evaluation every 4
    "model.backbone=resnet_tiny", "model.num_classes=4", "model.aspp_channels=16", "model.output_stride=16",
    "data.dataset=synthetic", "data.synthetic_classes=4", "data.synthetic_size=80", "data.crop_size=65",
    "data.synthetic_train=16", "data.synthetic_val=4", "data.loader_workers=0", "data.val_size=80",
    f"train.max_iterations={MAX_ITERATIONS}", "train.eval_interval=4", "train.log_interval=1",
    "train.batch_size=4", "train.lr=0.3", "train.bn_momentum=0.1", "train.amp=off", "train.seed=3",
    "train.channels_last=false", "cluster.num_workers=2", "cluster.cpus_per_worker=1", "cluster.max_failures=0",
    "cluster.collective_timeout_s=60",
]


def train_command(storage: Path, name: str) -> list:
    sets = [arg for s in SETTINGS for arg in ("--set", s)]
    return [sys.executable, "-m", "cluster.train", "--config", os.path.join(ROOT, "configs", "demo.yaml"), *sets,
            "--storage-path", str(storage), "--name", name]


def _processes_using(folder: str) -> list:
    """Processes whose command line names ``folder`` (a Ray started with RAY_TMPDIR=folder: its every process)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if folder in cmdline:
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def run(command: list, pause: str = None, stop: int = None, ignore_sigint: bool = False, timeout: float = 300):
    """Run ``command``; with ``pause``, send ``stop`` when it prints the pause marker, or a line that is ``pause``
    (SIGINT to its process group, as Ctrl-C in a terminal does; SIGTERM to the process, as kill or a scheduler
    does). Returns (exit code, stdout, stderr). Afterwards no process of the local Ray it started may be left."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are limited to 107 bytes
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    if pause:
        env["DEEPLAB_TEST_PAUSE"] = pause

    def child_setup():
        if ignore_sigint:  # a background job of a non-interactive shell inherits SIGINT ignored
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True, preexec_fn=child_setup)
        out, deadline, sent = [], time.monotonic() + timeout, False
        try:
            for line in proc.stdout:
                out.append(line)
                if pause and not sent and (line.startswith("test-pause:") or line.strip() == pause):
                    time.sleep(0.5)  # every worker at the point, not only the first to print
                    (os.killpg if stop == signal.SIGINT else os.kill)(proc.pid, stop)
                    sent = True
                if time.monotonic() > deadline:
                    break
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        err.seek(0)
        stderr = err.read()
    for _ in range(50):  # Ray's processes get a moment to finish exiting
        left = _processes_using(ray_tmp)
        if not left:
            break
        time.sleep(0.2)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    stdout = "".join(out)
    assert not pause or sent, f"never reached the pause point {pause}:\n{stdout[-2000:]}\n{stderr[-2000:]}"
    assert not left, f"Ray processes left running after the command exited: {left}"
    return proc.returncode, stdout, stderr


def checkpoints(run_dir: Path) -> dict:
    """{iteration: payload} of every complete checkpoint in the run folder, read independently of the code
    under test; asserts that no model.ckpt is half-written."""
    found = {}
    for path in sorted(run_dir.glob("checkpoint_*/model.ckpt")):
        payload = torch.load(path, map_location="cpu", weights_only=True)  # a half-written file fails here
        found[payload["state"]["iteration"]] = payload
    return found


def resumed_from(stdout: str):
    """The iteration the run resumed from (0: it started afresh) and the first iteration it trained."""
    resumed = [ln for ln in stdout.splitlines() if ln.startswith("resuming from ")]
    start = int(resumed[0].split(" at iteration ")[1].split("/")[0]) if resumed else 0
    first = next(int(ln.split()[1].split("/")[0]) for ln in stdout.splitlines() if ln.startswith("iter "))
    return start, first


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run, never interrupted."""
    storage = tmp_path_factory.mktemp("reference")
    code, out, err = run(train_command(storage, "run"))
    assert code == 0, err[-3000:]
    return storage / "run"


# (pause point, signal, SIGINT ignored at start, what the one line says was kept, the iteration the run had
# finished when stopped, the newest complete checkpoint's iteration then: where the next run must resume)
STOPS = [
    ("before-ray", signal.SIGINT, True, "no checkpoint written yet", 0, 0),
    ("step@1", signal.SIGTERM, False, "no checkpoint written yet", 0, 0),  # during the first iteration
    ("evaluate@4", signal.SIGINT, False, "no checkpoint written yet", 4, 0),  # the first evaluation
    ("checkpoint-write@8", signal.SIGINT, False, "checkpoint of iteration 4 kept", 8, 4),  # model.ckpt half-copied
    ("checkpoint-written@8", signal.SIGTERM, False, "checkpoint of iteration 8 kept", 8, 8),  # Ray not told yet
]


def test_stopped_anywhere_and_run_again_ends_as_the_uninterrupted_run(reference, tmp_path):
    command = train_command(tmp_path, "run")
    run_dir = tmp_path / "run"
    newest = 0  # the newest complete checkpoint's iteration: where the next run must resume
    resumes = []  # (iteration a stop came at, checkpoint the next run resumed from), as summary.json must list
    for pause, stop, ignore_sigint, kept, reached, resume_at in STOPS:
        code, out, err = run(command, pause, stop, ignore_sigint)
        where = f"stopped at {pause} with {signal.Signals(stop).name}"
        if "\niter " in "\n" + out:  # it trained: from the newest complete checkpoint the last stop left
            assert resumed_from(out) == (newest, newest + 1), f"{where}: redid or skipped work\n{out[-2000:]}"
        assert code == 128 + stop, f"{where}: exit {code}\n{out[-2000:]}\n{err[-3000:]}"
        lines = [ln for ln in err.splitlines() if ln.startswith("interrupted (")]
        assert len(lines) == 1 and lines[0].startswith(f"interrupted ({signal.Signals(stop).name}): {kept}") \
            and "the same command" in lines[0], f"{where}: {lines}\n{err[-2000:]}"
        assert "Traceback" not in err and "Tuner.restore" not in out + err, f"{where}:\n{err[-3000:]}"
        done = checkpoints(run_dir)  # every model.ckpt there loads
        for name in ("progress.json", "summary.json", "checkpoint_manager_snapshot.json"):
            if (run_dir / name).exists():
                json.loads((run_dir / name).read_text())
        assert max(done, default=0) == resume_at, f"{where}: complete checkpoints {sorted(done)}"
        if reached:  # the next run trains again from resume_at
            resumes.append((reached, resume_at))
        newest = resume_at

    code, out, err = run(command)  # the same command a last time, to the end
    assert code == 0, err[-3000:]
    assert resumed_from(out) == (newest, newest + 1), out[-2000:]
    assert not list(run_dir.glob("checkpoint_*/.*")), "a temporary file of a cut-short upload is left"

    final, expected = checkpoints(run_dir)[MAX_ITERATIONS], checkpoints(reference)[MAX_ITERATIONS]
    for key, value in expected["model"].items():  # CPU, gloo, same seed, exact resume: bit for bit
        torch.testing.assert_close(final["model"][key], value, rtol=0, atol=0, msg=key)
    for key in ("iteration", "loss", "val_miou", "val_iou"):
        assert final["state"]["metrics"][key] == expected["state"]["metrics"][key], key
    summary = json.loads((run_dir / "summary.json").read_text())
    reference_summary = json.loads((reference / "summary.json").read_text())
    assert summary["iterations"] == MAX_ITERATIONS
    assert summary["final_val_miou"] == reference_summary["final_val_miou"]
    assert [(r["reached_iteration"], r["checkpoint_iteration"]) for r in summary["resumes"]] == resumes
    assert summary["redone_iterations"] == sum(r - c for r, c in resumes) == 8
    assert "restarted 3 time(s) from a checkpoint, 8 iteration(s) done again" in out
    assert (run_dir / "best.ckpt").is_file() and summary["best_val_miou"] == reference_summary["best_val_miou"]


RAY_GET_SCRIPT = """
import sys, time
import ray
from cluster.ray_session import init_ray
from deeplab.cli import command
from deeplab.config import load_config

@ray.remote(num_cpus=0)
def sleep():
    time.sleep(600)

@command
def main(argv=None):
    init_ray(load_config(None, []), local=True, num_cpus=1)
    task = sleep.remote()
    print("waiting", flush=True)
    ray.get(task)
    return 0

sys.exit(main())
"""


def test_sigterm_during_ray_get_still_exits_143():
    """A driver started by cluster.ray_session.init_ray (ray.init installs its own SIGTERM handlers, Python's and Ray
    Core's, which aborts) waiting in ray.get, as tuning.search_rates waits in Tune: ray.get checks for signals
    itself and raises a new, plain KeyboardInterrupt in place of the command's Stopped(SIGTERM). The exit must
    still say SIGTERM, 143."""
    code, out, err = run([sys.executable, "-c", RAY_GET_SCRIPT], pause="waiting", stop=signal.SIGTERM)
    assert code == 143 and err.splitlines()[-1] == "interrupted (SIGTERM): nothing half-written", (code, err[-2000:])
