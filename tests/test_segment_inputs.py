"""cluster.segment without Ray: what INPUT lists (folders, list files, URIs through pyarrow), how outputs are
named, what counts as done on a rerun, and the command line's one-line errors (exit 2 before Ray starts)."""
import json
import os
from pathlib import Path

import pytest

from cluster import segment, segment_inputs, segment_outputs, segment_pipeline
from cluster.segment_inputs import InputError, list_inputs
from cluster.segment_outputs import Manifest, split_done


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_is_listed_recursively_with_mirrored_names_and_without_hidden_files_or_output(tmp_path):
    root = tmp_path / "in"
    for rel in ("a.jpg", "sub/b.png", "sub/deeper/c.jpeg", ".hidden.jpg", ".cache/d.jpg", "out/old.png"):
        touch(root / rel)
    inputs = list_inputs(str(root), exclude=str(root / "out"))
    assert sorted((i.uri, i.name) for i in inputs.items) == [
        (str(root / "a.jpg"), "a"), (str(root / "sub/b.png"), "sub/b"),
        (str(root / "sub/deeper/c.jpeg"), "sub/deeper/c")]


def test_inputs_that_would_share_an_output_keep_their_suffix(tmp_path):
    root = tmp_path / "in"
    for rel in ("x.jpg", "x.png", "y.jpg"):
        touch(root / rel)
    names = {os.path.basename(i.path): i.name for i in list_inputs(str(root)).items}
    assert names == {"x.jpg": "x.jpg", "x.png": "x.png", "y.jpg": "y"}


def test_extensions_filter_counts_what_it_leaves_out(tmp_path):
    root = tmp_path / "in"
    for rel in ("a.JPG", "b.png", "notes.txt", "c.tif"):
        touch(root / rel)
    inputs = list_inputs(str(root), extensions=["jpg", ".png"])
    assert sorted(i.name for i in inputs.items) == ["a", "b"] and inputs.ignored == 2


def test_list_file_paths_are_relative_to_the_list_and_named_from_their_common_folder(tmp_path):
    photos = tmp_path / "photos"
    touch(photos / "2024/a.jpg")
    touch(photos / "2025/b.jpg")
    touch(tmp_path / "elsewhere/c.jpg")
    listing = photos / "todo.txt"
    listing.write_text(f"# my list\n2024/a.jpg\n\n{photos / '2025/b.jpg'}\n2024/a.jpg\n")
    inputs = list_inputs(str(listing))
    assert [(i.path, i.name) for i in inputs.items] == [(str(photos / "2024/a.jpg"), "2024/a"),
                                                         (str(photos / "2025/b.jpg"), "2025/b")]
    listing.write_text(f"{photos / '2024/a.jpg'}\n{tmp_path / 'elsewhere/c.jpg'}\n")
    assert [i.name for i in list_inputs(str(listing)).items] == ["photos/2024/a", "elsewhere/c"]


def test_uri_prefix_is_listed_through_pyarrow(tmp_path):
    """file:// goes through pyarrow.fs.FileSystem.from_uri, the same path s3://bucket/prefix takes."""
    root = tmp_path / "in"
    touch(root / "a.jpg", b"abc")
    touch(root / "sub/b.jpg")
    inputs = list_inputs(f"file://{root}")
    assert sorted(i.name for i in inputs.items) == ["a", "sub/b"]
    item = next(i for i in inputs.items if i.name == "a")
    assert item.uri == f"file://{root}/a.jpg"
    with inputs.filesystem.open_input_stream(item.path) as f:
        assert f.read() == b"abc"


def test_one_image_is_a_collection_of_one(tmp_path):
    image = touch(tmp_path / "street.jpg")
    assert [(i.path, i.name) for i in list_inputs(str(image)).items] == [(str(image), "street")]
    single = list_inputs(f"file://{image}")  # one object under a URI
    assert [(i.uri, i.name) for i in single.items] == [(f"file://{image}", "street")]


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "no such folder or list file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no files to segment"),
    (lambda p: touch(p / "list.txt", b"# nothing\n\n"), "names no files"),
    (lambda p: touch(p / "mixed.txt", b"/tmp/a.jpg\ns3://bucket/b.jpg\n"), "mixes filesystems"),
    (lambda p: touch(p / "photos.tar", bytes(range(256))), "not a text file listing paths"),
])
def test_bad_input_is_one_line_naming_it(tmp_path, make, message):
    source = make(tmp_path)
    with pytest.raises(InputError) as e:
        list_inputs(str(source))
    assert message in str(e.value) and str(source) in str(e.value) and "\n" not in str(e.value)


def test_done_means_an_ok_record_and_every_output_file(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    for rel in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        touch(root / rel)
    items = {i.name: i for i in list_inputs(str(root)).items}
    for f in ("a.png", "a_color.png", "a_overlay.png", "b.png", "c.png", "c_color.png", "c_overlay.png"):
        touch(out / f)
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"path": items["a"].uri, "status": "ok"}, {"path": items["b"].uri, "status": "ok"},
        {"path": items["d"].uri, "status": "failed", "error": "x"}]) + '{"path": "cut sh')
    manifest = Manifest(out / "manifest.jsonl")  # the cut last line (a killed driver) is skipped
    todo, done = split_done(list(items.values()), manifest, out, color=True)
    # a: ok and complete; b: colour pictures missing; c: files but no record; d: failed before
    assert [i.name for i in done] == ["a"] and [i.name for i in todo] == ["b", "c", "d"]
    todo, done = split_done(list(items.values()), manifest, out, color=False)
    assert [i.name for i in done] == ["a", "b"]


def test_manifest_keeps_the_last_record_per_image_and_is_rewritten_one_line_each(tmp_path):
    m = Manifest(tmp_path / "manifest.jsonl")
    m.append([{"path": "a", "status": "failed", "error": "x"}, {"path": "b", "status": "ok"}])
    m.append([{"path": "a", "status": "ok"}])
    m.close()
    lines = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert lines == [{"path": "a", "status": "ok"}, {"path": "b", "status": "ok"}]


def test_stale_temporary_files_of_a_killed_writer_are_removed(tmp_path):
    keep = [touch(tmp_path / "a.png"), touch(tmp_path / ".config"), touch(tmp_path / "sub/b.png")]
    stale = [touch(tmp_path / ".a_color.png.1234.tmp"), touch(tmp_path / "sub/.b.png.99.tmp")]
    assert segment_outputs.remove_stale_temps(tmp_path) == 2
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


@pytest.mark.parametrize("args, message", [
    (["missing.ckpt", "IN", "-o", "OUT"], "missing.ckpt: no such model file"),
    (["MODEL", "IN", "-o", "OUT", "--workers", "0"], "segment.workers=0 must be >= 1"),
    (["MODEL", "IN", "-o", "OUT", "--set", "segment.cpus_per_worker=0"],
     "must be > 0 unless segment.gpus_per_worker > 0"),
    (["MODEL", "IN", "-o", "OUT", "--alpha", "2"], "--alpha 2: inference.alpha=2"),
    (["MODEL", "nowhere", "-o", "OUT"], "nowhere: no such folder or list file"),
    (["MODEL", "IN", "-o", "OUT", "--output-stride", "8", "--set", "segment.batch_size=0"], "segment.batch_size=0"),
    (["model.txt", "IN", "-o", "OUT"], "unknown model file type '.txt'"),
    (["MODEL", "IN", "-o", "nosuch://bucket/out"], "nosuch://bucket/out: cannot write (cannot open it: "),
])
def test_command_line_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch, args, message):
    from inference_files import tiny_checkpoint

    monkeypatch.chdir(tmp_path)
    tiny_checkpoint(tmp_path / "MODEL.ckpt")
    touch(tmp_path / "IN" / "a.jpg")
    touch(tmp_path / "model.txt")
    args = [a.replace("MODEL", "MODEL.ckpt") if a == "MODEL" else a for a in args]
    assert segment.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "OUT").exists()


def test_pool_size_defaults_to_what_the_cluster_holds_and_warns_when_a_request_does_not_fit():
    from cluster.config import SegmentConfig

    said = []
    assert segment_pipeline.size_pool(SegmentConfig(), {"CPU": 8.0}, said.append) == 7  # 7 x 1 CPU + 0.5 to read
    assert segment_pipeline.size_pool(SegmentConfig(gpus_per_worker=1), {"CPU": 8.0, "GPU": 4.0}, said.append) == 4
    assert segment_pipeline.size_pool(SegmentConfig(), {"CPU": 1.0}, said.append) == 1 and len(said) == 1
    assert "waits for an autoscaler" in said[0] and "1.5 CPUs" in said[0]
    assert segment_pipeline.size_pool(SegmentConfig(workers=3), {"CPU": 8.0}, said.append) == 3 and len(said) == 1


def test_mixed_sizes_run_one_call_per_size_and_equal_each_image_alone(tmp_path, one_thread):
    import numpy as np

    from cluster.infer import predict_labels
    from deeplab.data import normalize
    from export.model_file import load_runner
    from inference_files import photo, tiny_checkpoint

    runner = load_runner(tiny_checkpoint(tmp_path / "m.ckpt"), device="cpu")
    calls = []
    labels_of = runner.labels
    runner.labels = lambda batch: calls.append(batch.shape) or labels_of(batch)
    images = [photo(size, seed) for seed, size in enumerate([(40, 56), (33, 33), (40, 56), (57, 41), (33, 33)])]
    out = predict_labels(runner, images)
    assert sorted(calls) == [(1, 3, 57, 41), (2, 3, 33, 33), (2, 3, 40, 56)]
    for image, labels in zip(images, out):
        assert labels.shape == image.shape[:2]
        np.testing.assert_array_equal(labels, labels_of(normalize(image)[None].numpy())[0])


def test_a_size_the_engine_cannot_run_fails_alone():
    """Stand-in for a TensorRT engine (none here) whose optimization profile stops at 64x64."""
    import numpy as np

    from cluster.infer import predict_labels
    from export.runners import EngineError

    class ProfileLimited:
        def labels(self, batch):
            if max(batch.shape[2:]) > 64:
                raise EngineError(f"engine: input shape {batch.shape} is outside the engine's optimization profile")
            return np.zeros((len(batch),) + batch.shape[2:], np.uint8)

    images = [np.zeros((32, 32, 3), np.uint8), np.zeros((80, 80, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)]
    out = predict_labels(ProfileLimited(), images, keep_errors=True)
    assert [o.shape for o in (out[0], out[2])] == [(32, 32), (32, 32)] and isinstance(out[1], EngineError)
    with pytest.raises(EngineError):
        predict_labels(ProfileLimited(), images)


# ------------------------------------------------------------------ hostile paths (issue 20): never outside OUTPUT
def _inside(out, names, color=True):
    root = out.resolve()
    return all((out / rel).resolve().is_relative_to(root)
               for n in names for rel in segment_outputs.expected_outputs(n, color))


def test_list_file_uris_with_dotdot_are_named_from_normalized_paths(tmp_path):
    """The reproduced escape: file:///W/imgs/sub/../../outside/secret.png once named OUT/../../outside/secret."""
    touch(tmp_path / "imgs/sub/a.png")
    secret = touch(tmp_path / "outside/secret.png")
    listing = touch(tmp_path / "imgs/list.txt", (f"file://{tmp_path}/imgs/sub/a.png\n"
                                                 f"file://{tmp_path}/imgs/sub/../../outside/secret.png\n"
                                                 f"file://{tmp_path}/imgs/sub/../sub/a.png\n").encode())
    inputs = list_inputs(str(listing))
    assert sorted(i.name for i in inputs.items) == ["imgs/sub/a", "outside/secret"]  # a.png listed once
    assert _inside(tmp_path / "OUT", [i.name for i in inputs.items])
    item = next(i for i in inputs.items if i.name == "outside/secret")
    with inputs.filesystem.open_input_stream(item.path) as f:
        assert f.read() == secret.read_bytes()


def test_object_store_keys_that_climb_out_of_the_prefix_are_refused(tmp_path):
    """S3 keeps '..' in keys as written; an in-memory fsspec store behind pyarrow does the same."""
    fsspec = pytest.importorskip("fsspec")
    import pyarrow.fs as pafs

    memory = fsspec.filesystem("memory")
    keys = ["/bucket/photos/a.jpg", "/bucket/photos/../../etc/x.jpg", "/bucket/photos/sub/../b.jpg",
            "/bucket/photos/.//c.jpg", "/bucket/photos/b.jpg", "/bucket/photos/.hidden.jpg"]
    for key in keys:
        memory.pipe(key, key.encode())
    try:
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(memory))
        inputs = list_inputs("bucket/photos", filesystem=fs)
        assert sorted((i.name, i.path) for i in inputs.items) == [
            ("a", keys[0]), ("b", keys[4]), ("c", keys[3])]  # the key read is the key as written
        refused = dict(inputs.refused)
        assert sorted(refused) == [keys[1], keys[2]]
        assert "outside INPUT" in refused[keys[1]] and refused[keys[1]].startswith(keys[1] + ": ")
        assert "names the same output as another input (b.jpg)" in refused[keys[2]]
        assert _inside(tmp_path / "OUT", [i.name for i in inputs.items])
    finally:
        memory.rm("/bucket", recursive=True)


def test_list_file_keys_that_climb_out_of_their_bucket_are_refused():
    assert segment_inputs._normalized("bucket/a/../../x.jpg", store=True) == (None, None)
    assert segment_inputs._normalized("bucket/a/../x.jpg", store=True) == ("bucket/x.jpg", "bucket/x.jpg")
    assert segment_inputs._normalized("/bucket/./a//b.jpg", store=True)[0] == "bucket/a/b.jpg"


def test_link_loops_list_each_file_once(tmp_path):
    root = tmp_path / "in"
    touch(root / "a.jpg")
    touch(root / "sub/b.jpg")
    (root / "sub/loop").symlink_to(root)  # in/sub/loop/sub/loop/... forever
    (root / "again").symlink_to(root / "sub")
    (root / "alias.jpg").symlink_to(root / "a.jpg")
    (root / "0first.jpg").symlink_to(root / "sub/b.jpg")  # a link that sorts first: the real file still names it
    (root / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    for source in (str(root), f"file://{root}"):
        inputs = list_inputs(source)
        assert sorted(i.name for i in inputs.items) == ["a", "sub/b"], source


def test_outputs_that_resolve_outside_output_are_refused_and_failed_in_the_manifest(tmp_path):
    from cluster.config import SegmentConfig

    root, out, elsewhere = tmp_path / "in", tmp_path / "out", tmp_path / "elsewhere"
    for rel in ("a.jpg", "sub/b.jpg", "c.jpg"):
        touch(root / rel)
    elsewhere.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(elsewhere)  # OUT/sub/b.png would land in elsewhere/
    (out / "c.png").symlink_to(elsewhere / "c.png")  # a link in place of an output file
    inputs = list_inputs(str(root), exclude=str(out))
    run, refused = segment_outputs.refuse_escaping(inputs.items, [], out, color=False)
    assert [i.name for i in run] == ["a"]
    reasons = dict(refused)
    assert sorted(reasons) == [str(root / "c.jpg"), str(root / "sub/b.jpg")]
    assert "outside OUTPUT" in reasons[str(root / "sub/b.jpg")] and str(elsewhere) in reasons[str(root / "sub/b.jpg")]
    # nothing to run but refusals: segment() writes their failed lines without starting Ray
    inputs.items = [i for i in inputs.items if i.name != "a"]
    model = tmp_path / "model.ckpt"  # OUTPUT records the model's hash; never opened as a model here
    model.write_bytes(b"not opened")
    summary = segment_pipeline.segment(str(model), inputs, out, SegmentConfig(), log=lambda m: None)
    assert summary.failed == 2 and summary.ok == 0
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in lines) == sorted(reasons) and all(r["status"] == "failed" for r in lines)
    assert list(elsewhere.iterdir()) == []


def test_a_decode_task_loads_neither_torch_nor_an_inference_runtime(tmp_path):
    """segment's read + decode tasks run in Ray worker processes that the raylet starts, reuses and ends when
    idle: they import only Pillow, numpy and pyarrow, not torch (seconds of import per worker under load)."""
    import subprocess
    import sys

    from PIL import Image

    Image.new("RGB", (9, 7), (10, 20, 30)).save(tmp_path / "a.png")
    code = (
        "import sys, pyarrow.fs as fs\n"
        "from cluster.segment_pipeline import read_and_decode\n"
        f"row = read_and_decode({{'path': {str(tmp_path / 'a.png')!r}, 'uri': 'a.png', 'name': 'a'}}, "
        "fs.LocalFileSystem(), None)\n"
        "assert not row['error'] and (row['height'], row['width']) == (7, 9), row\n"
        "print(sorted(m for m in ('torch', 'onnxruntime', 'openvino', 'tensorrt') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
