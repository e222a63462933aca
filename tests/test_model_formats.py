"""One model artifact from checkpoint to node: the table of model formats (export.model_file.FORMATS), the metadata
record every exporter writes and every runner reads, the engine's sidecar hash, the node cache keyed by content
hash, and cluster.segment's model identity in OUTPUT. Real files made here (checkpoint, ONNX, OpenVINO IR); no Ray
(tests/test_model_shipping_ray.py runs the same files on a 2-node cluster) and no GPU."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cluster import infer
from cluster.segment_inputs import InputItem
from cluster.segment_outputs import MANIFEST, MODEL_RECORD, Manifest, ModelMismatch, claim_output
from export import model_file, runners, to_onnx
from export.metadata import RECORD_DEFAULTS, read_metadata, set_metadata
from export.model_file import (
    ModelFileError,
    ModelFormat,
    format_of,
    formats_help,
    load_runner,
    model_files,
    open_model_file,
    read_model_info,
)
from export.runners import EngineError, sidecar_path, write_sidecar
from inference_files import tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
H200 = {"gpu_name": "NVIDIA H200", "compute_capability": "9.0", "tensorrt_version": "11.4.0"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    ckpt = tiny_checkpoint(d / "tiny.ckpt")
    assert to_onnx.main([str(ckpt), "-o", str(d / "model.onnx"), "--output-stride", "16"]) == 0
    out = {"ckpt": ckpt, "onnx": d / "model.onnx"}
    try:
        from export import to_openvino
    except ImportError:
        return out
    assert to_openvino.main([str(d / "model.onnx"), "-o", str(d / "ir" / "model.xml")]) == 0
    return {**out, "xml": d / "ir" / "model.xml"}


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _engine(folder: Path, files, data: bytes = b"serialized engine", **extra) -> Path:
    """An engine file and its sidecar as export.to_tensorrt writes them (the bytes are never parsed here)."""
    engine = folder / "model.engine"
    engine.write_bytes(data)
    write_sidecar(engine, {**H200, "precision": "fp16", "metadata": read_metadata(files["onnx"]),
                           "engine_sha256": hashlib.sha256(data).hexdigest(), **extra})
    return engine


# ------------------------------------------------------------------------------------------ the table
def test_every_format_names_all_its_files_and_a_missing_companion_is_one_line(files, tmp_path):
    assert model_files(files["ckpt"]) == [files["ckpt"]]
    assert model_files(files["onnx"]) == [files["onnx"]]
    engine = _engine(tmp_path, files)
    assert model_files(engine) == [engine, sidecar_path(engine)]
    if "xml" in files:
        assert model_files(files["xml"]) == [files["xml"], files["xml"].with_suffix(".bin")]
        lone = tmp_path / "lone" / "model.xml"
        lone.parent.mkdir()
        shutil.copy(files["xml"], lone)
        with pytest.raises(ModelFileError) as e:
            model_files(lone)
        assert "model.bin" in str(e.value) and str(lone) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelFileError, match="unknown model file type '.pt'"):
        (tmp_path / "weights.pt").write_bytes(b"x")
        format_of(tmp_path / "weights.pt")
    assert [f.name for f in model_file.FORMATS] == ["checkpoint", "onnx", "openvino", "tensorrt"]
    for fmt in model_file.FORMATS:  # --help of every command names every format from the table
        assert fmt.label in formats_help()
    assert "checkpoint" not in formats_help(exported_only=True)


def test_adding_a_format_is_one_entry(files, tmp_path, monkeypatch):
    """A new format added to FORMATS alone is recognised, shipped with its companion, read and opened."""
    onnx_fmt = format_of(files["onnx"])
    fake = ModelFormat("renamed-onnx", (".fakeonnx",), "a test format (.fakeonnx with its .notes)",
                       lambda p: [p.with_suffix(".notes")], onnx_fmt.read_info, onnx_fmt.open_runner)
    monkeypatch.setattr(model_file, "FORMATS", model_file.FORMATS + (fake,))
    model = tmp_path / "m.fakeonnx"
    shutil.copy(files["onnx"], model)
    (tmp_path / "m.notes").write_text("notes")
    assert model_files(model) == [model, tmp_path / "m.notes"]
    assert read_model_info(model).num_classes == 5
    assert load_runner(model, device="cpu")(np.zeros((1, 3, 33, 33), np.float32)).shape == (1, 5, 33, 33)
    assert set(infer.model_identity(model)["files"]) == {"m.fakeonnx", "m.notes"}
    assert fake.label in formats_help()


def test_a_model_handle_is_what_each_reader_of_the_path_says(files, tmp_path):
    """open_model_file reads every file once; its metadata, hashes, identity and shipped bytes are those that
    read_model_info, sha256 of the files and model_identity give for the same path."""
    models = [files["ckpt"], files["onnx"], _engine(tmp_path, files)] + ([files["xml"]] if "xml" in files else [])
    for path in models:
        handle = open_model_file(path)
        assert handle.files == model_files(path)
        assert handle.sha256 == {f.name: _sha(f) for f in model_files(path)}
        assert handle.data == {f.name: f.read_bytes() for f in model_files(path)}
        assert handle.info.to_dict() == read_model_info(path).to_dict()
        assert infer.model_identity(handle) == infer.model_identity(path)
    assert open_model_file(files["ckpt"], output_stride=8).info.output_stride == 8
    with pytest.raises(ModelFileError, match="exported at output stride 16"):
        open_model_file(files["onnx"], output_stride=8)


def test_a_model_handle_loads_a_checkpoint_weights_only(tmp_path):
    """The handle's bytes go through torch.load(weights_only=True): a pickled object is refused, not run."""
    import torch

    from deeplab.checkpoint import CheckpointError

    evil = tmp_path / "evil.ckpt"
    torch.save({"format": "deeplabv3", "payload": _Ran()}, evil)
    with pytest.raises(CheckpointError, match="refused, it holds pickled objects"):
        open_model_file(evil)
    assert not _Ran.ran


class _Ran:
    ran = False

    def __reduce__(self):
        return (_Ran._mark, ())

    @staticmethod
    def _mark():
        _Ran.ran = True


# ----------------------------------------------------------------------------------- the metadata record
@pytest.mark.parametrize("kind", ["onnx", "xml"])
def test_every_exporter_writes_the_whole_record(files, kind):
    if kind not in files:
        pytest.skip("openvino is not installed")
    from deeplab import load_checkpoint

    cfg = load_checkpoint(files["ckpt"]).config
    if kind == "onnx":
        meta = read_metadata(files["onnx"])
    else:
        from export.metadata import read_ir_metadata

        meta = read_ir_metadata(files["xml"])
    assert set(RECORD_DEFAULTS) <= set(meta)
    assert meta["align_corners"] is cfg.align_corners is True  # head "paper"
    assert meta["source_sha256"] == _sha(files["ckpt"]) and meta["precision"] == "fp32"
    assert meta["input_layout"] == "NCHW" and meta["backbone"] == "resnet_tiny"
    assert meta["project_version"] and meta["num_classes"] == 5 and len(meta["class_names"]) == 5
    info = read_model_info(files[kind])
    assert (info.align_corners, info.source_sha256, info.precision) == (True, _sha(files["ckpt"]), "fp32")


def _old_onnx(src: Path, dst: Path, drop) -> Path:
    """The ONNX as an exporter before the record wrote it: ``drop`` fields absent."""
    import onnx

    model = onnx.load(str(src))
    set_metadata(model, {k: v for k, v in read_metadata(model).items() if k not in drop})
    onnx.save(model, str(dst))
    return dst


def test_file_written_before_the_record_opens_with_defaults_and_one_warning_line(files, tmp_path, capsys):
    new_fields = ["align_corners", "input_layout", "precision", "dataset", "source_sha256", "project_version"]
    old = _old_onnx(files["onnx"], tmp_path / "old.onnx", new_fields)
    capsys.readouterr()
    info = read_model_info(old)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and str(old) in err[0]
    assert all(name in err[0] for name in new_fields)
    # align_corners from the file's own model_config (what its checkpoint resized with), the rest documented
    assert (info.align_corners, info.precision, info.input_layout, info.source_sha256) == (True, "fp32", "NCHW", None)
    older = _old_onnx(files["onnx"], tmp_path / "older.onnx", new_fields + ["model_config"])
    assert read_model_info(older).align_corners is RECORD_DEFAULTS["align_corners"] is False
    capsys.readouterr()
    read_model_info(files["onnx"])
    assert "warning" not in capsys.readouterr().err  # a file with the whole record: no warning


# ------------------------------------------------------------------------------------------- TensorRT
def test_engine_runs_only_with_the_bytes_its_sidecar_vouches_for(files, tmp_path):
    """GPU-free: the hash is checked before TensorRT or the GPU is looked at."""
    engine = _engine(tmp_path, files)
    with pytest.raises(EngineError) as e:  # the right bytes pass the hash check; the machine check comes next
        runners.TensorRTRunner(engine)
    assert "sha256" not in str(e.value)
    engine.write_bytes(b"serialized engine, changed")
    with pytest.raises(EngineError) as e:
        runners.TensorRTRunner(engine)
    msg = str(e.value)
    assert "sha256" in msg and "run only engines you built" in msg and str(engine) in msg and "\n" not in msg
    info = json.loads(sidecar_path(engine).read_text())
    del info["engine_sha256"]  # a sidecar from before the hash was recorded
    sidecar_path(engine).write_text(json.dumps(info))
    with pytest.raises(EngineError, match="records no engine_sha256"):
        runners.TensorRTRunner(engine)


# ------------------------------------------------------------------------------------- the node cache
def test_node_cache_is_keyed_by_content_and_replaces_a_changed_file(files, tmp_path, monkeypatch):
    if "xml" not in files:
        pytest.skip("openvino is not installed")
    monkeypatch.setenv(infer.CACHE_ENV, str(tmp_path / "cache"))
    shipped = infer.model_identity(files["xml"])
    blobs = {f.name: f.read_bytes() for f in model_files(files["xml"])}
    fetched = []

    def fetch(name):
        fetched.append(name)
        return blobs[name]

    path = infer._materialize(shipped, fetch)
    assert path.parent.name == shipped["sha256"][:32] and sorted(fetched) == ["model.bin", "model.xml"]
    assert all((path.parent / n).read_bytes() == b for n, b in blobs.items())
    fetched.clear()
    assert infer._materialize(shipped, fetch) == path and fetched == []  # cached and intact: not fetched again
    bin_file = path.with_suffix(".bin")
    bin_file.write_bytes(bin_file.read_bytes()[:-7] + b"changed")  # same name, other bytes
    infer._materialize(shipped, fetch)
    assert fetched == ["model.bin"] and bin_file.read_bytes() == blobs["model.bin"]
    assert read_model_info(path).num_classes == 5
    with pytest.raises(RuntimeError, match="sha256"):
        bad = {**shipped, "sha256": "0" * 64}
        infer._materialize(bad, lambda name: b"not what was hashed")


# -------------------------------------------------------------------------------- segment's model identity
def _out_with_results(out: Path, names) -> Manifest:
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out / MANIFEST)
    for n in names:
        (out / f"{n}.png").write_bytes(b"png")
    manifest.append([{"path": f"/in/{n}.jpg", "status": "ok", "outputs": [f"{n}.png"]} for n in names])
    manifest.close()
    return Manifest(out / MANIFEST)


def test_output_belongs_to_one_model(files, tmp_path):
    out, items = tmp_path / "out", [InputItem(f"/in/{n}.jpg", f"/in/{n}.jpg", n) for n in ("a", "b")]
    manifest = Manifest(out / MANIFEST)
    out.mkdir()
    first = claim_output(out, files["ckpt"], items, manifest, overwrite=False)
    assert json.loads((out / MODEL_RECORD).read_text())["sha256"] == first["sha256"]
    manifest = _out_with_results(out, ["a", "b"])
    copy = tmp_path / "elsewhere" / "same.ckpt"
    copy.parent.mkdir()
    shutil.copy(files["ckpt"], copy)
    assert claim_output(out, copy, items, manifest, overwrite=False)["sha256"] == first["sha256"]  # same content
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ModelMismatch) as e:
        claim_output(out, files["onnx"], items, manifest, overwrite=False)
    msg = str(e.value)
    assert str(files["ckpt"]) in msg and str(files["onnx"]) in msg and "--overwrite" in msg and "\n" not in msg
    assert sorted(p.name for p in out.iterdir()) == before and len(Manifest(out / MANIFEST).records) == 2
    claim_output(out, files["onnx"], items, manifest, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MODEL_RECORD]  # the other model's results are gone
    assert json.loads((out / MODEL_RECORD).read_text())["model"] == str(files["onnx"])


def test_output_of_a_run_before_the_record_is_not_taken_for_this_models(files, tmp_path):
    out = tmp_path / "old-out"
    manifest = _out_with_results(out, ["a"])
    with pytest.raises(ModelMismatch, match="a model it did not record"):
        claim_output(out, files["ckpt"], [], manifest, overwrite=False)
