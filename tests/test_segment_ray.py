"""cluster.segment on a real 2-node Ray cluster (ray.cluster_utils.Cluster), run as a user types it: 20 real
PNG/JPEG photos of mixed sizes in nested folders plus a truncated JPEG and a text file. Outputs are compared
pixel for pixel with deeplab.predict on the same checkpoint; a rerun skips what is done; a SIGKILLed actor
is replaced and every image is written once."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from cluster.segment_outputs import STALE_TEMP  # noqa: E402
from inference_files import BAD, image_collection, read_png, reference_predictions, tiny_checkpoint  # noqa: E402
from ray_nodes import nodes_for_commands  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    with nodes_for_commands(cpus=2, count=2) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segment")
    ckpt = tiny_checkpoint(folder / "tiny.ckpt")
    good = image_collection(folder / "photos")
    reference = reference_predictions(ckpt, folder / "photos", good, folder / "reference")
    return {"ckpt": ckpt, "input": folder / "photos", "good": good, "reference": reference}


def command(collection, out, cluster, *extra):
    return [sys.executable, "-m", "cluster.segment", str(collection["ckpt"]), str(collection["input"]), "-o", str(out),
            "--set", f"cluster.address={cluster.address}", "--set", "segment.progress_interval_s=1", *extra]


def run(collection, out, cluster, *extra, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command(collection, out, cluster, *extra), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def manifest(out: Path) -> list:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def outputs(out: Path) -> dict:
    """Every output PNG (relative path -> (inode, mtime_ns)): what was written, and whether it was again. A hidden
    ``.NAME.tmpPID.png`` is a write in progress, not an output (a killed writer's is removed by the driver)."""
    found = {}
    for folder, _, files in os.walk(out):
        for f in files:
            if f.endswith(".png") and not f.startswith("."):
                st = os.stat(os.path.join(folder, f))
                found[os.path.relpath(os.path.join(folder, f), out)] = (st.st_ino, st.st_mtime_ns)
    return found


def expected_files(good: list) -> set:
    return {f"{os.path.splitext(rel)[0]}{suffix}.png" for rel in good for suffix in ("", "_color", "_overlay")}


def test_segment_matches_predict_lists_failures_and_a_rerun_skips_what_is_done(cluster, collection, tmp_path):
    out = tmp_path / "out"
    first = run(collection, out, cluster, "--color", "--workers", "2", "--batch-size", "3")
    text = first.stdout + first.stderr
    assert first.returncode == 1, text[-3000:]  # the two planted files failed; everything else was done
    assert "error: 2 of 22 images failed" in first.stderr
    assert "22 images: 22 to segment, 0 already done" in first.stdout
    assert "segmented 22 images in" in first.stdout and "images/s (20 ok, 2 failed, 0 already done)" in first.stdout
    for noise in ("streaming_executor", "Execution plan", "Progress bars disabled"):  # Ray Data's, in its log
        assert noise not in text, noise
    # where the time before the first results went, phase by phase, within the run's own seconds
    startup = re.search(r"^start-up: (.*); then [\d.]+ images/s$", first.stdout, re.M)
    assert startup, first.stdout[-2000:]
    phases = {name: float(value.rstrip("s")) for name, value in (p.rsplit(" ", 1) for p in startup[1].split(", "))}
    assert list(phases) == ["model info", "listing", "Ray start", "ship model", "actor start", "model load",
                            "first batch"]
    seconds = float(re.search(r"segmented 22 images in ([\d.]+)s", first.stdout)[1])
    assert phases["model load"] > 0 and sum(list(phases.values())[3:]) <= seconds + 0.2, (phases, seconds)

    # every picture, at the input's relative path, equal to deeplab.predict's pixel for pixel
    written = outputs(out)
    assert set(written) == expected_files(collection["good"])
    labels_seen = set()
    for rel in collection["good"]:
        stem = os.path.splitext(rel)[0]
        name = os.path.basename(stem)
        for suffix in ("", "_color", "_overlay"):
            ours = read_png(out / f"{stem}{suffix}.png")
            theirs = read_png(collection["reference"] / f"{name}{suffix}.png")
            assert ours.shape == theirs.shape and np.array_equal(ours, theirs), f"{stem}{suffix}.png differs"
        labels_seen |= set(np.unique(read_png(out / f"{stem}.png")).tolist())
    assert len(labels_seen) > 1

    # the manifest: one record per input, sizes and pixel counts from the pictures, reasons for the failures
    records = {r["path"]: r for r in manifest(out)}
    assert len(records) == len(manifest(out)) == 22
    for rel in collection["good"]:
        r = records[str(collection["input"] / rel)]
        labels = read_png(out / f"{os.path.splitext(rel)[0]}.png")
        assert r["status"] == "ok" and (r["height"], r["width"]) == labels.shape and r["seconds"] > 0
        counts = np.bincount(labels.ravel(), minlength=5)
        assert r["pixels"] == {f"class_{k}": int(counts[k]) for k in np.argsort(-counts, kind="stable") if counts[k]}
    for rel in BAD:
        r = records[str(collection["input"] / rel)]
        assert r["status"] == "failed" and str(collection["input"] / rel) in r["error"]
    assert "truncated" in records[str(collection["input"] / "broken/half.jpg")]["error"]
    assert "not an image" in records[str(collection["input"] / "notes.txt")]["error"]

    # the same command again: nothing done is redone or rewritten; the failed ones are tried again
    second = run(collection, out, cluster, "--color", "--workers", "2", "--batch-size", "3")
    assert second.returncode == 1, (second.stdout + second.stderr)[-3000:]
    assert "22 images: 2 to segment, 20 already done" in second.stdout
    assert outputs(out) == written
    assert len(manifest(out)) == 22


def test_killed_actor_is_replaced_and_every_image_is_written_once(cluster, collection, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command(collection, out, cluster, "--workers", "1", "--batch-size", "2"), cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        victim = None
        deadline = time.monotonic() + 240
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            if (out / "manifest.jsonl").is_file():
                ok = [r for r in manifest(out) if r["status"] == "ok"]
                victim = int(ok[0]["worker"].rsplit(":", 1)[1]) if ok else None
            time.sleep(0.05)
        assert victim, "no image was segmented in time:\n" + "".join(lines[-40:])
        os.kill(victim, signal.SIGKILL)
        before = outputs(out)  # what the dead actor had written: must never be written again
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    text = "".join(lines)
    if len(before) == len(collection["good"]):
        pytest.fail("the run finished before the actor was killed:\n" + text[-3000:])
    assert proc.returncode == 1, text[-3000:]
    records = manifest(out)
    assert len(records) == 22 and len({r["path"] for r in records}) == 22
    assert sum(r["status"] == "ok" for r in records) == 20
    after = outputs(out)
    assert set(after) == {f"{os.path.splitext(rel)[0]}.png" for rel in collection["good"]}
    assert all(after[f] == before[f] for f in before), "an output written before the kill was written again"
    workers = {r["worker"] for r in records if r["status"] == "ok"}
    assert len(workers) >= 2 and any(int(w.rsplit(":", 1)[1]) != victim for w in workers), workers
    written = [f for r in records if r["status"] == "ok" for f in r["written"]]
    assert len(written) == len(set(written))  # no record claims a file another one wrote
    assert not [f for _, _, files in os.walk(out) for f in files if STALE_TEMP.match(f)]  # killed writes cleaned
    for rel in collection["good"]:
        stem = os.path.splitext(rel)[0]
        assert np.array_equal(read_png(out / f"{stem}.png"),
                              read_png(collection["reference"] / f"{os.path.basename(stem)}.png"))


def test_hostile_list_file_and_links_in_output_never_write_outside_output(cluster, collection, tmp_path):
    """Issue 20, as a user would meet it: a list file whose file:// entry climbs out with '..' onto another
    picture, an EPS file named .png, and a link inside OUTPUT to a folder elsewhere. Outputs are named from
    normalized paths; the linked folder's image is failed with its reason; nothing lands outside OUTPUT."""
    from PIL import Image

    from inference_files import photo

    root, out, elsewhere = tmp_path / "imgs", tmp_path / "out", tmp_path / "elsewhere"
    for rel, seed in (("sub/a.png", 1), ("outside/secret.png", 2), ("sub/linked/c.png", 3)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo((24, 32), seed)).save(root / rel)
    (root / "sub/drawing.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    secret = (root / "outside/secret.png").read_bytes()
    elsewhere.mkdir()
    out.mkdir()
    (out / "sub").mkdir()
    (out / "sub/linked").symlink_to(elsewhere)
    listing = root / "list.txt"
    listing.write_text("".join(f"file://{root}/{rel}\n" for rel in (
        "sub/a.png", "sub/../outside/secret.png", "sub/drawing.png", "sub/linked/c.png")))
    cmd = [sys.executable, "-m", "cluster.segment", str(collection["ckpt"]), str(listing), "-o", str(out),
           "--set", f"cluster.address={cluster.address}", "--workers", "1"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, (done.stdout + done.stderr)[-3000:]
    assert "4 images: 3 to segment, 0 already done, 1 refused" in done.stdout
    records = {r["path"]: r for r in manifest(out)}
    status = {path.split(str(root))[-1]: r["status"] for path, r in records.items()}
    assert status == {"/sub/a.png": "ok", "/sub/../outside/secret.png": "ok", "/sub/drawing.png": "failed",
                      "/sub/linked/c.png": "failed"}
    assert "EPS images are not accepted" in records[f"file://{root}/sub/drawing.png"]["error"]
    assert "outside OUTPUT" in records[f"file://{root}/sub/linked/c.png"]["error"]
    assert set(outputs(out)) == {"sub/a.png", "outside/secret.png"}  # named from the normalized paths
    assert list(elsewhere.iterdir()) == [] and (root / "outside/secret.png").read_bytes() == secret
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "imgs", "out"]  # nothing written beside
