"""Run folders are built with the storage's filesystem, not by appending to the URL's text.

`s3://bucket/runs?endpoint_override=...&scheme=http` (an S3-compatible server of one's own) once put best.ckpt and
summary.json under a key containing the query, beside a run folder of Ray's checkpoints without it. Checked
here against a real S3 server (moto, on loopback) with the functions cluster.train writes them with.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from cluster.storage import run_folder
from cluster.train import BEST_FILE, SUMMARY_FILE, _write_summary, copy_checkpoint
from s3_server import s3_server  # noqa: F401 (the fixture)


def test_run_folder_keeps_query_out_of_paths_and_in_urls(tmp_path, monkeypatch):
    s3 = run_folder("s3://bkt/runs/?endpoint_override=127.0.0.1:9&scheme=http", "stage1")
    assert s3.path == "bkt/runs/stage1" and not s3.local
    assert s3.url == "s3://bkt/runs/stage1?endpoint_override=127.0.0.1:9&scheme=http"
    assert s3.child(BEST_FILE).url == "s3://bkt/runs/stage1/best.ckpt?endpoint_override=127.0.0.1:9&scheme=http"
    assert run_folder("s3://KEY:SECRET@bkt/runs?region=us-east-1", "r").url == "s3://bkt/runs/r?region=us-east-1"
    gs = run_folder("gs://bkt/p?scheme=http&endpoint_override=127.0.0.1:9", "r")
    assert (gs.path, gs.url) == ("bkt/p/r", "gs://bkt/p/r?scheme=http&endpoint_override=127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    local = run_folder("runs", "demo")
    assert local.local and local.path == local.url == str(tmp_path / "runs" / "demo")
    assert local.child(BEST_FILE).path == str(tmp_path / "runs" / "demo" / "best.ckpt")


def test_best_and_summary_land_in_the_run_folder_on_s3(s3_server, tmp_path):
    """In a fresh interpreter, as cluster.train runs it. The run folder's filesystem opens s3:// with
    allow_delayed_open, so summary.json is one PUT: moto answered pyarrow's multipart completions with replies
    pyarrow took for embedded errors, and retried them for 25-50 s (a failure on a loaded CI machine)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}
    code = "import sys, test_run_folder as t; t.land_on_s3(sys.argv[1], sys.argv[2])"
    proc = subprocess.run([sys.executable, "-c", code, s3_server.endpoint, str(tmp_path)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def land_on_s3(s3_server: str, tmp: str) -> None:
    import pyarrow.fs

    tmp_path = Path(tmp)
    storage = f"s3://bkt/runs?endpoint_override={s3_server}&scheme=http"
    pyarrow.fs.S3FileSystem(endpoint_override=s3_server, scheme="http", allow_bucket_creation=True).create_dir("bkt")
    folder = run_folder(storage, "stage1")
    checkpoint = tmp_path / "checkpoint_000"
    checkpoint.mkdir()
    (checkpoint / "model.ckpt").write_bytes(b"weights")
    # as cluster.train does: Ray's checkpoint (here uploaded by hand) copied within the store, then the summary
    fs = folder.filesystem
    pyarrow.fs.copy_files(str(checkpoint), f"{folder.path}/checkpoint_000", destination_filesystem=fs)
    copy_checkpoint(f"{folder.path}/checkpoint_000", folder.child(BEST_FILE).path, fs)
    _write_summary({"run": folder.url}, folder)

    keys = sorted(i.path for i in fs.get_file_info(pyarrow.fs.FileSelector("bkt", recursive=True)) if i.is_file)
    assert keys == ["bkt/runs/stage1/best.ckpt", "bkt/runs/stage1/checkpoint_000/model.ckpt",
                    "bkt/runs/stage1/summary.json"]
    with fs.open_input_stream("bkt/runs/stage1/summary.json") as f:
        assert json.loads(f.read()) == {"run": f"s3://bkt/runs/stage1?endpoint_override={s3_server}&scheme=http"}
    # the printed URL opens the same file again (what export.to_onnx, cluster.segment are given)
    again, path = pyarrow.fs.FileSystem.from_uri(folder.child(BEST_FILE).url)
    with again.open_input_stream(path) as f:
        assert f.read() == b"weights"
    assert SUMMARY_FILE == "summary.json"
