"""Joining a cluster as a user does: `ray start --head` on this machine, then a command in a fresh interpreter.

Ray 2.60's `ray start --head` turns token authentication on whenever this machine has a token (the first local
`ray.init` writes ~/.ray/auth_token), but a driver's `ray.init(address=...)` sends it only with
RAY_AUTH_MODE=token: without cluster/ray_session.py's help the command is refused for a minute and then fails
(with cluster.address) or quietly starts a cluster of its own (with the address `ray start` recorded). Each test
runs with a HOME and a Ray temp folder of its own; the head binds 127.0.0.1 and every process it started is ended
by its id."""
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from cluster.ray_session import free_port
from inference_files import photo, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _processes_mentioning(text: str) -> set:
    """Live processes whose command line contains ``text`` (the Ray temp folder of this module), from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if text in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                    found.add(int(entry))
            except OSError:
                continue
    return found


def _with_descendants(pids: set) -> set:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = set(pids), list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head started by `ray start` on 127.0.0.1 under token authentication (a token in this HOME), with its
    address recorded in the module's Ray temp folder; (environment for commands, GCS address, dashboard URL)."""
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay under 108 characters
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(home), RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    port, dashboard = free_port(), free_port()
    started = subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                              "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
                              "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield env, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}"
    finally:
        pids = _with_descendants(_processes_mentioning(ray_tmp))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("join")
    photos = folder / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(photo((40, 48), seed=i)).save(photos / f"img{i}.png")
    return {"ckpt": tiny_checkpoint(folder / "tiny.ckpt"), "photos": photos}


def segment(head, files, out, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.segment", str(files["ckpt"]), str(files["photos"]), "-o",
                           str(out), "--verbose", *extra], cwd=ROOT, env=head[0], capture_output=True, text=True,
                          timeout=300)


def test_the_head_ray_start_brought_up_asks_for_the_token(head):
    """The premise: this head refuses a caller without the token (its dashboard answers 401)."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{head[2]}/api/version", timeout=30)
    assert refused.value.code == 401


@pytest.mark.parametrize("how", ["cluster.address", "recorded"])
def test_a_command_joins_the_head_with_this_machines_token(head, files, tmp_path, how):
    """By cluster.address, and by the address `ray start` recorded (no option): the command joins that head
    (Ray's "Connecting to existing Ray cluster" line under --verbose) and segments every image."""
    extra = ["--set", f"cluster.address={head[1]}"] if how == "cluster.address" else []
    done = segment(head, files, tmp_path / "out", *extra)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    port = head[1].rsplit(":", 1)[1]  # Ray names the GCS by this machine's address
    assert re.search(rf"Connecting to existing Ray cluster at address: [\d.]+:{port}\.\.\.", output), output[-3000:]
    assert "InvalidAuthToken" not in output
    assert sorted(p.name for p in (tmp_path / "out").glob("img*.png")) == ["img0.png", "img1.png", "img2.png"]


def test_an_address_nothing_answers_on_fails_at_once_in_one_line(head, files, tmp_path):
    """Ray would retry for minutes, a warning a second; the command says what is wrong in one line."""
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    done = segment(head, files, tmp_path / "out", "--set", f"cluster.address={address}")
    assert done.returncode == 2 and time.monotonic() - start < 60
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: cannot join the Ray cluster at {address} (cluster.address): nothing answers there (Connection "
        "refused); is it running, and is the port open from here?")
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
