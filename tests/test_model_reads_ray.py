"""How often one `cluster.segment` run's driver opens the model's files: once each (issue 32; it was up to five
times: metadata, a content hash per output claim, shipping). Counted by a Python audit hook ("open" events: every
`open`, `Path.read_bytes`, `torch.load` and `onnx.load` of a path) in the driver, run as a user runs it against a
real local Ray cluster; the workers open the shipped copy in their model cache, never these paths."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from inference_files import image_collection, tiny_checkpoint  # noqa: E402
from ray_nodes import nodes_for_commands  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

# The driver: count opens of the model's files, then run the command as `python -m cluster.segment` does.
DRIVER = """
import atexit, json, os, runpy, sys
counts = {os.path.realpath(p): 0 for p in sys.argv[2].split(os.pathsep)}
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if path in counts:
            counts[path] += 1
sys.addaudithook(hook)
report = sys.argv[1]
atexit.register(lambda: open(report, "w").write(json.dumps(counts)))
sys.argv = ["cluster.segment", *sys.argv[3:]]
runpy.run_module("cluster.segment", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def cluster():
    with nodes_for_commands(cpus=2) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from export import to_onnx

    folder = tmp_path_factory.mktemp("reads")
    ckpt = tiny_checkpoint(folder / "tiny.ckpt")
    assert to_onnx.main([str(ckpt), "-o", str(folder / "model.onnx")]) == 0
    found = {"ckpt": [ckpt], "onnx": [folder / "model.onnx"]}
    try:
        from export import to_openvino
    except ImportError:
        return found
    assert to_openvino.main([str(folder / "model.onnx"), "-o", str(folder / "ir" / "model.xml")]) == 0
    return {**found, "xml": [folder / "ir" / "model.xml", folder / "ir" / "model.bin"]}


@pytest.mark.parametrize("kind", ["ckpt", "onnx", "xml"])
def test_one_segment_run_reads_each_model_file_once(cluster, models, kind, tmp_path):
    if kind not in models:
        pytest.skip("openvino is not installed")
    files = models[kind]
    photos = tmp_path / "photos"
    image_collection(photos, count=3)
    out = tmp_path / "masks"
    out.mkdir()  # an existing OUTPUT is claimed before Ray starts and again by the pipeline: both read the model
    report = tmp_path / "reads.json"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), str(report), os.pathsep.join(map(str, files)), str(files[0]), str(photos),
           "-o", str(out), "--set", f"cluster.address={cluster.address}", "--workers", "1"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert "segmented 5 images" in done.stdout, done.stdout + done.stderr  # 3 photos, a broken JPEG, a text file
    reads = json.loads(report.read_text())
    print(f"{kind}: driver opened {reads}")
    assert reads == {os.path.realpath(f): 1 for f in files}
