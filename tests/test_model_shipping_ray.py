"""Every file of a model reaches every node: cluster.segment's and cluster.serve's code, driven from this process,
on a real 2-node Ray cluster (one CPU each; two model actors or replicas of 0.6 CPU cannot share a node) with
the model's own folder removed right after the driver shipped it, so the nodes can only open what travelled
through the object store into their cache. A checkpoint, an ONNX file, an OpenVINO IR (.xml + .bin) and an
INT8 IR; masks equal to deeplab.predict's where the precision is the same. One cluster, three tiny images;
segment's refusal of another model's OUTPUT is run as users type it."""
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("openvino")

from cluster import infer, segment_pipeline  # noqa: E402
from cluster import serve as serve_module  # noqa: E402
from cluster.config import SegmentConfig, ServeConfig  # noqa: E402
from inference_files import SIZES, photo, read_png, reference_predictions, tiny_checkpoint  # noqa: E402
from ray_nodes import free_port, one_cpu_nodes  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
KINDS = ("ckpt", "onnx", "xml", "int8")
FP32 = ("ckpt", "onnx", "xml")  # same precision as the checkpoint: masks equal deeplab.predict's


def _run(args, timeout=600):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


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
    from export import to_onnx, to_openvino

    assert to_onnx.main([str(ckpt), "-o", str(onnx), "--output-stride", "16"]) == 0
    assert to_openvino.main([str(onnx), "-o", str(d / "model.xml")]) == 0
    # INT8 in its own process, as tests/test_export_openvino.py does (NNCF in the test process breaks later forks)
    proc = _run(["export.to_openvino", str(onnx), "-o", str(d / "model.int8.xml"), "--precision", "int8",
                 "--calib-images", "4", "--accuracy-images", "0"])
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
    saved = os.environ.get(infer.CACHE_ENV)
    os.environ[infer.CACHE_ENV] = str(cache)  # set before the nodes start: their workers inherit it
    try:
        with one_cpu_nodes(2) as nodes:
            yield nodes.address, cache
            from ray import serve

            serve.shutdown()
    finally:
        os.environ.pop(infer.CACHE_ENV, None)
        if saved is not None:
            os.environ[infer.CACHE_ENV] = saved


def own_copy(models, kind: str, tmp_path) -> Path:
    """The model's files alone in a folder of their own (the folder removed once the driver shipped them)."""
    folder = tmp_path / f"{kind}-model"
    folder.mkdir()
    for f in models["files"][kind]:
        shutil.copy(f, folder / f.name)
    return folder / models["files"][kind][0].name


@pytest.fixture
def ship_then_remove(monkeypatch):
    """cluster.infer.ship_model as it is, then the model's folder removed: nodes have only what was shipped
    (patched in segment's pipeline and in serve, which import it)."""
    ship = infer.ship_model
    shipped_from = []

    def ship_and_remove(path):
        handle = ship(path)
        shutil.rmtree(Path(path).parent)
        shipped_from.append(Path(path))
        return handle

    for consumer in (segment_pipeline, serve_module):  # where the commands' code calls it
        monkeypatch.setattr(consumer, "ship_model", ship_and_remove)
    return shipped_from


def segment(model: Path, models, out: Path, overwrite: bool = False):
    from cluster.segment_inputs import list_inputs
    from cluster.segment_pipeline import segment as run_segment

    cfg = SegmentConfig(workers=2, batch_size=1, cpus_per_worker=0.6, cpus_per_decode=0.3, progress_interval_s=60)
    return run_segment(model, list_inputs(str(models["images"])), out, cfg, log=lambda m: None, overwrite=overwrite)


def assert_mask(models, name: str, got: np.ndarray, kind: str) -> None:
    ref = read_png(models["reference"] / name)
    assert got.shape == ref.shape and got.dtype == np.uint8
    if kind in FP32:
        np.testing.assert_array_equal(got, ref, err_msg=f"{kind}: {name}")


@pytest.mark.parametrize("kind", KINDS)
def test_segment_opens_every_format_on_both_nodes_from_what_was_shipped(models, cluster, kind, tmp_path,
                                                                         ship_then_remove):
    _, cache = cluster
    model, out = own_copy(models, kind, tmp_path), tmp_path / "out"
    summary = segment(model, models, out)
    assert ship_then_remove == [model] and not model.parent.exists()
    assert (summary.ok, summary.failed) == (3, 0), summary.failures
    for name in models["names"]:
        assert_mask(models, name, read_png(out / name), kind)
    identity = json.loads((out / "model.json").read_text())
    assert sorted(identity["files"]) == sorted(f.name for f in models["files"][kind])
    folder = cache / identity["sha256"][:32]  # the node cache: one folder per model content, every file in it
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(identity["files"])


def test_another_model_is_refused_before_any_work_and_overwrite_redoes_every_image(models, cluster, tmp_path):
    address, _ = cluster
    out = tmp_path / "out"
    onnx, ir = own_copy(models, "onnx", tmp_path), own_copy(models, "xml", tmp_path)
    assert segment(onnx, models, out).ok == 3
    again = segment(onnx, models, out)
    assert (again.skipped, again.ok) == (3, 0)  # the same model resumes
    first = {n: os.stat(out / n).st_mtime_ns for n in models["names"]}
    refused = _run(["cluster.segment", str(ir), str(models["images"]), "-o", str(out),
                    "--set", f"cluster.address={address}"])
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert str(onnx) in lines[0] and str(ir) in lines[0] and "--overwrite" in lines[0]
    assert "Connect" not in refused.stdout + refused.stderr  # stopped before Ray
    assert {n: os.stat(out / n).st_mtime_ns for n in models["names"]} == first  # nothing touched
    redo = segment(ir, models, out, overwrite=True)
    assert (redo.ok, redo.skipped) == (3, 0)
    assert all(os.stat(out / n).st_mtime_ns != first[n] for n in models["names"])
    assert json.loads((out / "model.json").read_text())["model"] == str(ir)
    for name in models["names"]:
        assert_mask(models, name, read_png(out / name), "xml")


def _post(port: int, data: bytes) -> tuple:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/segment", body=data, headers={"Content-Type": "image/png"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def serve_port():
    return free_port()


@pytest.mark.parametrize("kind", KINDS)
def test_serve_opens_every_format_on_both_nodes_from_what_was_shipped(models, cluster, kind, tmp_path, serve_port,
                                                                       ship_then_remove):
    """cluster.serve's start(): the app is deployed again for each model on one Serve instance."""
    from ray.util.state import list_actors

    from cluster.serve import start

    model = own_copy(models, kind, tmp_path)
    start(model, ServeConfig(port=serve_port, replicas=2, cpus_per_replica=0.6), timeout_s=300)
    assert ship_then_remove == [model] and not model.parent.exists()
    replicas = [a for a in list_actors(address=cluster[0], filters=[("state", "=", "ALIVE")], timeout=60)
                if "SegmentService" in a.class_name]
    assert len({a.node_id for a in replicas}) == 2, replicas
    for name in models["names"]:
        status, body = _post(serve_port, (models["images"] / name).read_bytes())
        assert status == 200, body[:300]
        with Image.open(io.BytesIO(body)) as im:
            assert_mask(models, name, np.asarray(im), kind)
