"""cluster.segment with OUTPUT in a bucket (issue 28): `-o s3://bkt/masks?endpoint_override=HOST:PORT&scheme=http`
on a real S3 server (moto on loopback) and a real 2-node Ray cluster, run as a user types it, keys in the
environment. The masks in the bucket equal deeplab.predict's pixel for pixel, at the inputs' relative paths
and under keys without the query; the manifest lists every image; the same command again writes no mask
(the server's request log and the objects' dates say so); another model into the same OUTPUT is refused in
one line. Ctrl-C mid-run leaves the manifest merged in the bucket and a rerun finishes the rest. The manifest's
part objects (what a driver killed outright leaves) are read and merged by the next run."""
import io
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
from PIL import Image

from inference_files import image_collection, photo, reference_predictions, tiny_checkpoint
from ray_nodes import one_cpu_nodes
from s3_server import s3_server  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow  # a 2-node Ray cluster and six commands (~2 min)
ROOT = Path(__file__).resolve().parents[1]
BUCKET, PREFIX = "bkt", "masks"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
IMAGES = 40  # the stopped run's: one a call, enough to be stopped mid-run


@pytest.fixture(scope="module")
def cluster():
    """The nodes hold the bucket's keys in their environment, as cloud nodes hold theirs: the model actors open
    OUTPUT with them (nothing secret comes from the driver)."""
    saved = {k: os.environ.get(k) for k in KEYS}
    os.environ.update(KEYS)
    try:
        with one_cpu_nodes(2) as nodes:
            yield nodes
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segment_s3")
    ckpt = tiny_checkpoint(folder / "tiny.ckpt")
    good = image_collection(folder / "photos", count=8)
    reference = reference_predictions(ckpt, folder / "photos", good, folder / "reference")
    return {"ckpt": ckpt, "other": tiny_checkpoint(folder / "other.ckpt", seed=1), "input": folder / "photos",
            "good": good, "reference": reference}


def output_url(s3_server) -> str:
    return f"s3://{BUCKET}/{PREFIX}?endpoint_override={s3_server.endpoint}&scheme=http"


def segment(collection, s3_server, cluster, model="ckpt"):
    """The command in a fresh interpreter; two actors of half a CPU fit the two one-CPU nodes with a reader."""
    cmd = [sys.executable, "-m", "cluster.segment", str(collection[model]), str(collection["input"]),
           "-o", output_url(s3_server), "--color", "--workers", "2", "--cpus-per-worker", "0.5", "--batch-size", "3",
           "--set", f"cluster.address={cluster.address}"]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **KEYS, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=300)


def objects(s3) -> dict:
    """key -> (ETag, LastModified) of every object in the bucket (folder markers left out)."""
    listed = s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {o["Key"]: (o["ETag"], o["LastModified"]) for o in listed if not o["Key"].endswith("/")}


def png(s3, key: str) -> np.ndarray:
    with Image.open(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())) as im:
        return np.asarray(im)


def written_pngs(s3_server, since: int) -> list:
    return [path for method, path in s3_server.requests()[since:] if method == "PUT" and ".png" in path]


def test_masks_and_manifest_land_in_the_bucket_a_rerun_writes_nothing_and_another_model_is_refused(
        s3_server, cluster, collection):
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    first = segment(collection, s3_server, cluster)
    text = first.stdout + first.stderr
    assert first.returncode == 1, text[-3000:]  # the two planted files failed; everything else was done
    assert "10 images: 10 to segment, 0 already done" in first.stdout, text[-3000:]
    manifest_url = f"s3://{BUCKET}/{PREFIX}/manifest.jsonl?endpoint_override={s3_server.endpoint}&scheme=http"
    assert f"(8 ok, 2 failed, 0 already done); manifest: {manifest_url}" in first.stdout
    assert f"error: 2 of 10 images failed (reasons in {manifest_url})" in first.stderr

    # every picture at the input's relative path under OUTPUT's prefix, no key with the query, no part left
    stems = [os.path.splitext(rel)[0] for rel in collection["good"]]
    pictures = {f"{PREFIX}/{stem}{suffix}.png" for stem in stems for suffix in ("", "_color", "_overlay")}
    after_first = objects(s3)
    assert set(after_first) == pictures | {f"{PREFIX}/manifest.jsonl", f"{PREFIX}/model.json"}, sorted(after_first)
    for stem in stems:  # equal to deeplab.predict's, pixel for pixel
        for suffix in ("", "_color", "_overlay"):
            ours = png(s3, f"{PREFIX}/{stem}{suffix}.png")
            theirs = np.asarray(Image.open(collection["reference"] / f"{os.path.basename(stem)}{suffix}.png"))
            assert ours.shape == theirs.shape and np.array_equal(ours, theirs), f"{stem}{suffix}.png differs"
    assert len(written_pngs(s3_server, 0)) == len(pictures)  # each picture one PUT

    # the manifest: one record per input, pixel counts from the masks in the bucket, reasons for the failures
    lines = s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/manifest.jsonl")["Body"].read().decode().splitlines()
    records = {r["path"]: r for r in map(json.loads, lines)}
    assert len(records) == len(lines) == 10
    for rel, stem in zip(collection["good"], stems):
        r = records[str(collection["input"] / rel)]
        labels = png(s3, f"{PREFIX}/{stem}.png")
        assert r["status"] == "ok" and (r["height"], r["width"]) == labels.shape
        assert r["outputs"] == [f"{stem}.png", f"{stem}_color.png", f"{stem}_overlay.png"]
        assert sum(r["pixels"].values()) == labels.size
    assert "truncated" in records[str(collection["input"] / "broken/half.jpg")]["error"]
    model = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/model.json")["Body"].read())
    assert model["model"] == str(collection["ckpt"])

    # the same command again: one listing, nothing done is written again; the failed two are tried again
    before = len(s3_server.requests())
    second = segment(collection, s3_server, cluster)
    assert second.returncode == 1, (second.stdout + second.stderr)[-3000:]
    assert "10 images: 2 to segment, 8 already done" in second.stdout
    assert written_pngs(s3_server, before) == []
    after_second = objects(s3)
    assert {k: v for k, v in after_second.items() if k.endswith(".png")} == \
           {k: v for k, v in after_first.items() if k.endswith(".png")}
    heads = [path for method, path in s3_server.requests()[before:] if method == "HEAD" and ".png" in path]
    assert heads == [], heads[:5]  # done is known from one listing, not asked per image

    # another model into the same OUTPUT: one line naming both, before any work, nothing written
    before = len(s3_server.requests())
    other = segment(collection, s3_server, cluster, model="other")
    assert other.returncode == 2, (other.stdout + other.stderr)[-3000:]
    error = other.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: {output_url(s3_server)}: holds the results of model "
                                                   f"{collection['ckpt']}"), other.stderr
    assert "--overwrite" in error[0]
    assert [m for m, _ in s3_server.requests()[before:] if m in ("PUT", "POST", "DELETE")] == []
    assert objects(s3) == after_second


def test_stopped_mid_run_the_bucket_keeps_every_record_and_the_same_command_finishes(
        s3_server, cluster, collection, tmp_path):
    """Ctrl-C while the actors write: one line naming OUTPUT's URL and what was kept, manifest.jsonl merged in
    the bucket (no part left) with a record for every mask there, and the same command does the rest."""
    s3 = s3_server.client()
    s3.create_bucket(Bucket="stopped")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(IMAGES):
        Image.fromarray(photo((48, 64), seed=i)).save(photos / f"img{i:02d}.png")
    url = f"s3://stopped/masks?endpoint_override={s3_server.endpoint}&scheme=http"
    cmd = [sys.executable, "-m", "cluster.segment", str(collection["ckpt"]), str(photos), "-o", url,
           "--workers", "1", "--batch-size", "1", "--set", "segment.progress_interval_s=0.2",
           "--set", f"cluster.address={cluster.address}"]
    env = {**os.environ, **KEYS, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any(re.match(r"segment: [1-9]\d*/\d+ images", line) for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    stopped = [line.strip() for line in lines if line.startswith("interrupted (SIGINT): ")]
    assert len(stopped) == 1, "".join(lines)[-3000:]
    kept = re.fullmatch(rf"interrupted \(SIGINT\): (\d+) of {IMAGES} images segmented in {re.escape(url)} "
                        r"\(manifest\.jsonl\); the same command skips them and segments the other (\d+)", stopped[0])
    assert kept, stopped[0]
    done = int(kept[1])
    assert 0 < done < IMAGES, stopped[0]  # stopped while working
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="stopped").get("Contents", [])]
    assert not [k for k in keys if "manifest.parts/" in k and not k.endswith("/")], keys  # merged
    lines_ = s3.get_object(Bucket="stopped", Key="masks/manifest.jsonl")["Body"].read().decode().splitlines()
    ok = {json.loads(line)["path"] for line in lines_ if json.loads(line)["status"] == "ok"}
    masks = {k for k in keys if k.endswith(".png")}
    assert len(ok) >= done and len(masks) >= len(ok)  # every record has its mask (masks may outrun records)

    while True:  # the stopped job's actors are ended by Ray; a PUT under way when the driver left may land
        time.sleep(1)
        listed = {o["Key"] for o in s3.list_objects_v2(Bucket="stopped").get("Contents", []) if ".png" in o["Key"]}
        if listed == masks:
            break
        masks = listed

    before = len(s3_server.requests())
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert f"{IMAGES} images: {IMAGES - len(ok)} to segment, {len(ok)} already done" in again.stdout
    put = [path.split("/stopped/", 1)[1] for path in written_pngs(s3_server, before)]
    assert sorted(put) == sorted({f"masks/img{i:02d}.png" for i in range(IMAGES)} - masks)  # the rest, once each
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="stopped").get("Contents", [])]
    assert sorted(k for k in keys if k.endswith(".png")) == [f"masks/img{i:02d}.png" for i in range(IMAGES)]
    lines_ = s3.get_object(Bucket="stopped", Key="masks/manifest.jsonl")["Body"].read().decode().splitlines()
    assert sorted(json.loads(line)["status"] for line in lines_) == ["ok"] * IMAGES


def test_manifest_parts_left_by_a_killed_driver_are_read_and_merged(s3_server, tmp_path):
    """On a store the manifest cannot be appended to: records go to part objects as they arrive. A driver killed
    outright leaves them; the next one reads them (the last record for a path wins) and merges them into
    manifest.jsonl. In a fresh interpreter, as the command runs it."""
    s3_server.client().create_bucket(Bucket="parts")
    code = "import sys, test_segment_s3 as t; t.parts_round_trip(sys.argv[1])"
    env = {**os.environ, **KEYS, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.run([sys.executable, "-c", code, s3_server.endpoint], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def parts_round_trip(endpoint: str) -> None:
    from cluster.segment_outputs import MANIFEST, Output, open_manifest

    output = Output(f"s3://parts/out?endpoint_override={endpoint}&scheme=http")
    killed = open_manifest(output)
    killed.PART_RECORDS = 1  # a part per append, as every PART_SECONDS in a long run
    killed.append([{"path": "a.jpg", "status": "ok"}, {"path": "b.jpg", "status": "failed", "error": "x"}])
    killed.append([{"path": "b.jpg", "status": "ok"}])
    assert sorted(output.files()) == sorted(killed.parts) and len(killed.parts) == 2  # no manifest.jsonl yet

    rerun = open_manifest(output)
    assert rerun.records == {"a.jpg": {"path": "a.jpg", "status": "ok"}, "b.jpg": {"path": "b.jpg", "status": "ok"}}
    rerun.append([{"path": "c.jpg", "status": "ok"}])
    rerun.close()
    assert output.files() == {MANIFEST}  # merged, parts gone
    lines = output.read(MANIFEST).decode().splitlines()
    assert [json.loads(line)["path"] for line in lines] == ["a.jpg", "b.jpg", "c.jpg"]
    assert open_manifest(output).records == {**rerun.records}
