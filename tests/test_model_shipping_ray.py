"""Every file of a model reaches every node: cluster.segment and cluster.serve, run as users type them, on a real
2-node Ray cluster (one CPU each; two model actors or replicas of 0.6 CPU cannot share a node) with the model's
own folder removed right after the driver shipped it, so the nodes can only open what travelled through the
object store into their cache. A checkpoint, an ONNX file, an OpenVINO IR (.xml + .bin) and an INT8 IR; masks
equal to deeplab.predict's where the precision is the same. One cluster, three tiny images."""
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("openvino")

from cluster.infer import CACHE_ENV  # noqa: E402
from inference_files import SIZES, photo, read_png, reference_predictions, tiny_checkpoint  # noqa: E402
from ray_nodes import free_port, one_cpu_nodes  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FP32 = ("ckpt", "onnx", "xml")  # same precision as the checkpoint: masks equal deeplab.predict's
# The command as typed, except that the model's folder (argv[1]) is removed once the driver has shipped it.
SHIP_THEN_REMOVE = """
import shutil, sys
import cluster.infer as infer
ship = infer.ship_model
def ship_then_remove(path):
    shipped = ship(path)
    shutil.rmtree(sys.argv[1])
    return shipped
infer.ship_model = ship_then_remove
from importlib import import_module
sys.exit(import_module(sys.argv[2]).main(sys.argv[3:]))
"""
PLACEMENT = ["--set", "segment.cpus_per_worker=0.6", "--set", "segment.cpus_per_decode=0.3"]


def _run(args, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The four kinds of model file, made as users make them, and deeplab.predict's masks for three images."""
    d = tmp_path_factory.mktemp("shipping")
    ckpt = tiny_checkpoint(d / "tiny.ckpt")  # output stride 16: exported at 16, all formats run the same net
    images = d / "images"
    images.mkdir()
    for i, size in enumerate(SIZES[:3]):
        Image.fromarray(photo(size, seed=i)).save(images / f"img{i}.png")
    onnx = d / "model.onnx"
    for args in (["export.to_onnx", str(ckpt), "-o", str(onnx), "--output-stride", "16"],
                 ["export.to_openvino", str(onnx), "-o", str(d / "model.xml")],
                 ["export.to_openvino", str(ckpt), "-o", str(d / "model.int8.xml"), "--precision", "int8",
                  "--calib-images", "4", "--accuracy-images", "0", "--output-stride", "16"]):
        proc = _run(args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in images.iterdir())
    reference = reference_predictions(ckpt, images, names, d / "reference")
    return {"dir": d, "images": images, "names": names, "reference": reference,
            "files": {"ckpt": [ckpt], "onnx": [onnx], "xml": [d / "model.xml", d / "model.bin"],
                      "int8": [d / "model.int8.xml", d / "model.int8.bin"]}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two one-CPU nodes whose processes keep shipped models in a cache folder of this test."""
    cache = tmp_path_factory.mktemp("node-cache")
    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(cache)  # set before the nodes start: their workers inherit it
    try:
        with one_cpu_nodes(2) as nodes:
            yield nodes.address, cache
    finally:
        os.environ.pop(CACHE_ENV, None)
        if saved is not None:
            os.environ[CACHE_ENV] = saved


def own_copy(models, kind: str, tmp_path) -> Path:
    """The model's files alone in a folder of their own (the folder the command removes after shipping)."""
    folder = tmp_path / f"{kind}-model"
    folder.mkdir()
    for f in models["files"][kind]:
        shutil.copy(f, folder / f.name)
    return folder / models["files"][kind][0].name


def segment(model: Path, models, out: Path, address: str, *extra, remove=True):
    args = ["cluster.segment", str(model), str(models["images"]), "-o", str(out), "--workers", "2",
            "--set", f"cluster.address={address}", *PLACEMENT, *extra]
    if remove:
        args = ["-c", SHIP_THEN_REMOVE.strip(), str(model.parent)] + ["cluster.segment"] + args[1:]
        return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return _run(args)


def assert_masks(models, out: Path, kind: str) -> None:
    for name in models["names"]:
        got = read_png(out / name)
        ref = read_png(models["reference"] / name)
        assert got.shape == ref.shape and got.dtype == np.uint8
        if kind in FP32:
            np.testing.assert_array_equal(got, ref, err_msg=f"{kind}: {name}")


@pytest.mark.parametrize("kind", ["ckpt", "onnx", "xml", "int8"])
def test_segment_opens_every_format_on_both_nodes_from_what_was_shipped(models, cluster, kind, tmp_path):
    address, cache = cluster
    model = own_copy(models, kind, tmp_path)
    out = tmp_path / "out"
    proc = segment(model, models, out, address)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not model.parent.exists()  # the nodes had only the shipped files
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok"] * 3, records
    assert_masks(models, out, kind)
    identity = json.loads((out / "model.json").read_text())
    folder = cache / identity["sha256"][:32]  # the node cache: one folder per model content, every file in it
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(identity["files"])
    assert sorted(identity["files"]) == sorted(f.name for f in models["files"][kind])


def test_another_model_is_refused_before_any_work_and_overwrite_redoes_every_image(models, cluster, tmp_path):
    address, _ = cluster
    out = tmp_path / "out"
    onnx = own_copy(models, "onnx", tmp_path)
    assert segment(onnx, models, out, address, remove=False).returncode == 0
    rerun = segment(onnx, models, out, address, remove=False)
    assert rerun.returncode == 0 and "3 images: 0 to segment, 3 already done" in rerun.stdout
    first = {n: os.stat(out / n).st_mtime_ns for n in models["names"]}
    ir = own_copy(models, "xml", tmp_path)
    refused = segment(ir, models, out, address, remove=False)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert str(onnx) in lines[0] and str(ir) in lines[0] and "--overwrite" in lines[0]
    assert {n: os.stat(out / n).st_mtime_ns for n in models["names"]} == first  # nothing touched
    redo = segment(ir, models, out, address, "--overwrite")
    assert redo.returncode == 0 and "3 to segment, 0 already done" in redo.stdout, redo.stdout + redo.stderr
    assert all(os.stat(out / n).st_mtime_ns != first[n] for n in models["names"])
    assert json.loads((out / "model.json").read_text())["model"] == str(ir)
    assert_masks(models, out, "xml")


def _post(port: int, data: bytes) -> tuple:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/segment", body=data, headers={"Content-Type": "image/png"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["ckpt", "onnx", "xml", "int8"])
def test_serve_opens_every_format_on_both_nodes_from_what_was_shipped(models, cluster, kind, tmp_path):
    address, _ = cluster
    model, port = own_copy(models, kind, tmp_path), free_port()
    command = [sys.executable, "-c", SHIP_THEN_REMOVE.strip(), str(model.parent), "cluster.serve", str(model),
               "--port", str(port), "--replicas", "2", "--set", "serve.cpus_per_replica=0.6",
               "--set", f"cluster.address={address}"]
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not any(line.startswith("serving ") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start:\n" + "".join(lines[-40:])
            time.sleep(0.5)
        assert not model.parent.exists()
        for name in models["names"]:
            status, body = _post(port, (models["images"] / name).read_bytes())
            assert status == 200, body[:300]
            with Image.open(io.BytesIO(body)) as im:
                got = np.asarray(im)
            ref = read_png(models["reference"] / name)
            assert got.shape == ref.shape
            if kind in FP32:
                np.testing.assert_array_equal(got, ref, err_msg=f"{kind}: {name}")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, "".join(lines[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
