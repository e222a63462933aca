"""export.model_file.load_runner: one way to open a checkpoint, an ONNX file (FP32 and INT8 Q/DQ) or an engine,
each carrying the metadata the file itself holds. References are computed independently: the checkpoint's
model called directly, and onnxruntime sessions on the exported files. Tests that export ONNX are slow (10-40 s)."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab import load_checkpoint
from export.model_file import ModelFileError, load_runner, read_model_info
from export.runners import EngineError
from inference_files import photo, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="module")
def files(ckpt, tmp_path_factory):
    """The checkpoint, its OS8 ONNX export and an INT8 Q/DQ ONNX calibrated on a few photos."""
    from deeplab.data import normalize
    from export.precision import quantize_int8
    from export.to_onnx import export_checkpoint

    folder = tmp_path_factory.mktemp("models")
    onnx_path, _, _ = export_checkpoint(ckpt, folder / "tiny.onnx", output_stride=8, parity_sizes=(65,))
    calib = [normalize(photo((65, 65), seed))[None].numpy() for seed in range(4)]
    int8 = quantize_int8(onnx_path, folder / "tiny.int8.onnx", calib)
    return {"ckpt": ckpt, "onnx": onnx_path, "int8": int8}


def batch(seed=0, size=(41, 57), n=2):
    from deeplab.data import normalize

    return np.stack([normalize(photo(size, seed + i)).numpy() for i in range(n)])


def test_checkpoint_runner_is_the_checkpoint_model_with_its_metadata(ckpt, one_thread):
    runner = load_runner(ckpt, device="cpu")
    x = batch()
    model = load_checkpoint(ckpt).model.eval()
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(runner(x), reference)
    labels = runner.labels(x)
    assert labels.dtype == np.uint8 and labels.shape == (2, 41, 57)
    np.testing.assert_array_equal(labels, reference.argmax(1))
    assert len(np.unique(labels)) > 1  # the model's answer varies: equality above is not trivial
    info = runner.info
    assert (info.num_classes, info.output_stride, info.backend, info.precision, info.backbone) == (
        5, 16, "pytorch (cpu)", "fp32", "resnet_tiny")
    assert info.class_names == [f"class_{i}" for i in range(5)]
    assert load_runner(ckpt, output_stride=8, device="cpu").info.output_stride == 8
    json.dumps(info.to_dict())  # /info serves it as is


@pytest.mark.slow
def test_onnx_runner_reads_metadata_from_the_file_and_matches_the_checkpoint(files, one_thread):
    onnx_runner = load_runner(files["onnx"], device="cpu")
    info = onnx_runner.info
    assert (info.num_classes, info.output_stride, info.precision) == (5, 8, "fp32")
    assert info.backend == "onnxruntime (CPUExecutionProvider)"
    x = batch(seed=3)
    reference = load_runner(files["ckpt"], output_stride=8, device="cpu")(x)
    assert np.abs(onnx_runner(x) - reference).max() < 1e-3 * max(1.0, np.abs(reference).max())
    assert (onnx_runner.labels(x) == reference.argmax(1)).mean() > 0.99


@pytest.mark.slow
def test_int8_qdq_onnx_runs_and_says_so(files, one_thread):
    runner = load_runner(files["int8"], device="cpu")
    assert runner.info.precision == "int8" and runner.info.num_classes == 5
    x = batch(seed=5)
    fp32 = load_runner(files["onnx"], device="cpu").labels(x)
    labels = runner.labels(x)
    assert labels.shape == fp32.shape and (labels == fp32).mean() > 0.5


@pytest.mark.slow
def test_exported_model_refuses_another_output_stride(files):
    with pytest.raises(ModelFileError, match="exported at output stride 8; output stride 16 needs the checkpoint"):
        load_runner(files["onnx"], output_stride=16)
    assert read_model_info(files["onnx"]).output_stride == 8


@pytest.mark.slow
def test_files_that_are_not_models_fail_in_one_line_naming_them(files, tmp_path):
    import onnx

    bare = onnx.load(str(files["onnx"]))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"\x00not onnx at all" * 10)
    (tmp_path / "weights.bin").write_bytes(b"1234")
    cases = {tmp_path / "bare.onnx": "no deeplab.* metadata", tmp_path / "junk.onnx": "not a readable ONNX file",
             tmp_path / "weights.bin": "unknown model file type '.bin'", tmp_path / "none.onnx": "no such model file"}
    for path, message in cases.items():
        with pytest.raises(ModelFileError) as e:
            load_runner(path)
        assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_engine_metadata_comes_from_its_sidecar_and_loading_needs_the_gpu_it_was_built_for(files, tmp_path):
    """No TensorRT or GPU here: the sidecar is real JSON as export.to_tensorrt writes it; the engine bytes are
    never parsed because the runner refuses first."""
    from export.metadata import read_metadata
    from export.runners import write_sidecar

    engine = tmp_path / "tiny.engine"
    with pytest.raises(EngineError, match="no sidecar"):
        engine.write_bytes(b"serialized engine")
        load_runner(engine)
    write_sidecar(engine, {"gpu_name": "NVIDIA H200", "compute_capability": "9.0", "tensorrt_version": "11.4.0",
                           "precision": "int8", "metadata": read_metadata(files["onnx"]),
                           "engine_sha256": hashlib.sha256(b"serialized engine").hexdigest()})
    info = read_model_info(engine)
    assert (info.backend, info.precision, info.num_classes, info.output_stride) == ("tensorrt", "int8", 5, 8)
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="no CUDA GPU here"):
            load_runner(engine)
    with pytest.raises(ModelFileError, match="runs on its GPU only"):
        load_runner(engine, device="cpu")


@pytest.mark.slow
def test_checkpoint_and_its_onnx_describe_the_same_data(tmp_path):
    """What /info serves (ModelInfo.to_dict): a checkpoint trained on a dataset reports that data section, as the
    ONNX exported from it does (the checkpoint's was null)."""
    from deeplab import build_model, save_checkpoint
    from deeplab.config import DataConfig, ExperimentConfig, ModelConfig, to_plain
    from export.to_onnx import export_checkpoint

    exp = ExperimentConfig(model=ModelConfig(backbone="resnet_tiny", num_classes=4, aspp_channels=16),
                           data=DataConfig(synthetic_size=49, synthetic_classes=4, crop_size=49))
    ckpt = save_checkpoint(tmp_path / "tiny.ckpt", build_model(exp.model).eval(), exp)
    onnx_path, _, _ = export_checkpoint(ckpt, tmp_path / "tiny.onnx", output_stride=16, parity_sizes=(49,))
    from_ckpt, from_onnx = read_model_info(ckpt).to_dict(), read_model_info(onnx_path).to_dict()
    assert from_ckpt["data_config"] == from_onnx["data_config"] == to_plain(exp.data)
    for key in ("dataset", "class_names", "mean", "std", "num_classes", "output_stride", "align_corners"):
        assert from_ckpt[key] == from_onnx[key], key


@pytest.mark.slow
def test_segment_worker_runs_an_exported_model_without_loading_torch(files, tmp_path):
    """cluster.segment's read task and model actor on an ONNX file, in a fresh interpreter as a Ray worker runs
    them: the record and PNG come out, equal to the runner's torch path, and torch is never imported (loading
    it cost each of segment's worker processes ~1.1 s of start-up on this machine)."""
    image = tmp_path / "a.png"
    Image.fromarray(photo((41, 57), 5)).save(image)
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import pyarrow.fs
        from cluster.segment_pipeline import SegmentWorker, read_and_decode
        row = read_and_decode({{"path": {str(image)!r}, "uri": "a.png", "name": "a"}}, pyarrow.fs.LocalFileSystem(),
                              None)
        worker = SegmentWorker({str(files["onnx"])!r}, {str(out)!r}, color=True, alpha=0.5, output_stride=None,
                               num_gpus=0, cpus=1)
        result = worker({{key: np.array([value], dtype=object) for key, value in row.items()}})
        print(json.dumps({{"record": json.loads(result["record"][0]), "torch": "torch" in sys.modules}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["record"]["status"] == "ok", answer
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_color.png", "a_overlay.png"]
    from deeplab.data import normalize, read_mask

    x = normalize(np.asarray(Image.open(image).convert("RGB")))[None]
    reference = load_runner(files["onnx"], device="cpu").labels(x)[0]  # a torch tensor: the torch path
    np.testing.assert_array_equal(read_mask(out / "a.png"), reference)
    assert len(np.unique(reference)) > 1
    assert answer["torch"] is False
