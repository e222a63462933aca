"""Any model file the project writes, opened one way: the table of formats (`FORMATS`: a checkpoint, an ONNX file,
an OpenVINO IR, a TensorRT engine), the files each is made of, the metadata it carries (`ModelInfo`), and
`load_runner`, the one way every consumer (evaluate, predict, bench, segment, serve) runs one.

`open_model_file` reads a model's files once and keeps, from those same bytes, each file's sha256 and the metadata
(`ModelHandle`): a command that claims an output for a model, ships it to workers and shows it to the user reads
each file once, and what it claims is what it ships. The runners themselves (`export.runners`) are apart: this
module knows files, those know engines.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from deeplab.cli import UserError, error_line
from deeplab.config import ConfigError, to_plain
from deeplab.data.imagenet import IMAGENET_MEAN, IMAGENET_STD

from .metadata import (
    RECORD_DEFAULTS,
    complete_metadata,
    dataset_meta,
    file_sha256,
    project_version,
    read_ir_metadata,
    read_metadata,
)
from .runners import OnnxRunner, OpenVINORunner, TensorRTRunner, read_ir, read_sidecar, sidecar_path

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


class ModelFileError(UserError, ValueError):
    """A model file that cannot be opened for inference here; ``str(e)`` is one line naming the file."""


@dataclass
class ModelInfo:
    """What a model file says about itself (export.metadata's record): enough to feed it, read its output, resize
    as its checkpoint does and show it to a user."""

    path: str
    backend: str  # e.g. "pytorch (cpu)", "onnxruntime (CPUExecutionProvider)", "tensorrt"
    precision: str  # fp32 | fp16 | bf16 | int8
    num_classes: int
    class_names: list
    output_stride: int
    mean: tuple
    std: tuple
    backbone: Optional[str] = None
    val_miou: Optional[float] = None
    data_config: Optional[dict] = None  # the data section the model was trained with, where the file says
    align_corners: bool = False  # how multi-scale inference resizes for this model (as its checkpoint does)
    input_layout: str = "NCHW"
    dataset: Optional[str] = None
    source_sha256: Optional[str] = None  # the checkpoint it was exported from
    project_version: Optional[str] = None  # the project version that wrote it

    def to_dict(self) -> dict:
        """JSON-ready (tuples as lists)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

class ModelRunner:
    """A model file opened for inference. Call it on a normalized (N, 3, H, W) float32 batch (numpy or torch)
    for float32 numpy logits (N, classes, H, W) at the input size; ``labels`` gives the argmax as uint8 (N, H, W),
    computed where the logits are (the GPU for CUDA backends). ``info`` is the file's metadata. ``numpy_io``:
    ``forward`` takes and returns numpy arrays (ONNX Runtime, OpenVINO), so a numpy batch stays in numpy and
    running an exported model never loads torch (segment's actors and serve's replicas start faster)."""

    def __init__(self, forward, info: ModelInfo, numpy_io: bool = False):
        self._forward, self.info, self.numpy_io = forward, info, numpy_io

    def _logits(self, images):
        import torch

        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images, np.float32))
        out = self._forward(x)
        return out if isinstance(out, torch.Tensor) else torch.from_numpy(out)

    def __call__(self, images) -> np.ndarray:
        if self.numpy_io and isinstance(images, np.ndarray):
            return np.asarray(self._forward(images), np.float32)
        return self._logits(images).float().cpu().numpy()

    def labels(self, images) -> np.ndarray:
        if self.numpy_io and isinstance(images, np.ndarray):  # the first maximum on ties, as torch's argmax
            return np.asarray(self._forward(images)).argmax(1).astype(np.uint8)
        import torch

        return self._logits(images).argmax(1).to(torch.uint8).cpu().numpy()


def _check_normalization(path, mean, std) -> None:
    """Callers feed images normalized as deeplab.data.normalize does (ImageNet mean/std); refuse other files."""

    if not (np.allclose(mean, IMAGENET_MEAN, atol=1e-6) and np.allclose(std, IMAGENET_STD, atol=1e-6)):
        raise ModelFileError(f"{path}: expects inputs normalized with mean {list(mean)} / std {list(std)}; "
                             "this runtime feeds ImageNet's mean/std")


def _pick_device(device: Optional[str]) -> str:
    if device not in (None, "cpu", "cuda"):
        raise ModelFileError(f"device {device!r}: use cpu or cuda")
    if device == "cpu":  # no torch needed to know it: an exported model's worker never loads it
        return device
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ModelFileError("device cuda: torch sees no CUDA GPU here")
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _torch_runner(path: Path, output_stride: Optional[int], device: Optional[str], providers=None,
                  threads=None, raw: Optional[bytes] = None) -> ModelRunner:
    """``raw``: the file's bytes where the caller read them already (the checkpoint is loaded from them)."""
    import torch

    from deeplab.checkpoint import load_checkpoint
    from deeplab.inference import model_predictor

    if threads:
        torch.set_num_threads(int(threads))
    device = _pick_device(device)
    ckpt = load_checkpoint(path, data=raw)
    model = ckpt.model.eval().to(device)
    if output_stride is not None:
        try:
            model.set_output_stride(output_stride)  # the model's own check: what its config can reach
        except ConfigError as e:
            raise ModelFileError(f"{path}: output stride {output_stride}: {e}") from None
    data = ckpt.experiment.data if ckpt.experiment else None
    names, mean, std = dataset_meta(data, ckpt.config.num_classes)
    metrics = ckpt.state.get("metrics") or {}
    info = ModelInfo(str(path), f"pytorch ({device})", "fp32", ckpt.config.num_classes,
                     names or [f"class_{i}" for i in range(ckpt.config.num_classes)], model.config.output_stride,
                     tuple(mean), tuple(std), ckpt.config.backbone,
                     metrics.get("val_miou") if isinstance(metrics, dict) else None,
                     to_plain(data) if data is not None else None,  # as an export of it records (build_metadata)
                     align_corners=bool(ckpt.config.align_corners), dataset=getattr(data, "dataset", None),
                     source_sha256=hashlib.sha256(raw).hexdigest() if raw is not None else file_sha256(path),
                     project_version=project_version())

    predict = model_predictor(model, device=device)  # what deeplab.predict and evaluate run

    @torch.no_grad()
    def forward(x):
        return predict(x).float()

    return ModelRunner(forward, info)


def _checkpoint_info(path: Path, output_stride, data: Optional[dict] = None) -> ModelInfo:
    return _torch_runner(path, output_stride, "cpu", raw=data[path] if data else None).info


def _info_from_metadata(path: Path, meta: dict, backend: str, output_stride: Optional[int]) -> ModelInfo:
    """ModelInfo from the deeplab.* record that every exporter writes (export.metadata). A file written before a
    field existed gets its documented default and one warning line naming the missing fields."""

    if not isinstance(meta, dict) or "num_classes" not in meta:
        raise ModelFileError(f"{path}: no deeplab.* metadata (classes, output stride, mean/std); "
                             "export it with python -m export.to_onnx")
    meta, missing = complete_metadata(meta)
    if missing:
        print(f"warning: {path}: written before the metadata fields {', '.join(missing)}; using the defaults "
              f"({', '.join(f'{k}={meta[k]!r}' for k in missing if k in RECORD_DEFAULTS)})", file=sys.stderr)
    n = int(meta["num_classes"])
    stride = meta["output_stride"]
    if output_stride is not None and stride is not None and int(output_stride) != int(stride):
        raise ModelFileError(f"{path}: exported at output stride {stride}; output stride {output_stride} needs "
                             f"the checkpoint, or export it again with --output-stride {output_stride}")
    names = meta["class_names"] or []
    if len(names) != n:
        names = [f"class_{i}" for i in range(n)]
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    _check_normalization(path, mean, std)
    return ModelInfo(str(path), backend, str(meta["precision"]), n, list(names),
                     int(stride) if stride is not None else None, mean, std, meta["backbone"],
                     meta.get("val_miou"), meta.get("data_config"), bool(meta["align_corners"]),
                     str(meta["input_layout"]), meta["dataset"], meta["source_sha256"], meta["project_version"])


def _onnx_info(path: Path, output_stride, data: Optional[dict] = None, backend: str = "onnxruntime") -> ModelInfo:
    import onnx

    try:
        if data:  # the graph only: external weights are not needed for the metadata
            graph = onnx.load_model_from_string(data[path])
        else:
            graph = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several types for a file that is not ONNX
        raise ModelFileError(f"{path}: not a readable ONNX file ({error_line(e, 160)})") from None
    return _info_from_metadata(path, read_metadata(graph), backend, output_stride)


def _onnx_runner(path: Path, output_stride, device, providers=None, threads=None) -> ModelRunner:
    info = _onnx_info(path, output_stride)  # metadata first: a file without it fails before a session loads
    if providers is None and _pick_device(device) == "cpu":
        providers = ["CPUExecutionProvider"]
    runner = OnnxRunner(path, providers, threads)
    info.backend = f"onnxruntime ({runner.providers[0]})"
    return ModelRunner(runner, info, numpy_io=True)


def _openvino_info(path: Path, output_stride, data: Optional[dict] = None, model=None) -> ModelInfo:
    if model is None and data:
        model = read_ir(path, data[path], data[path.with_suffix(".bin")])
    elif model is None:
        model = OpenVINORunner(path).model  # one-line errors for a missing .bin or an unreadable IR
    return _info_from_metadata(path, read_ir_metadata(model), "openvino (CPU)", output_stride)


def _openvino_runner(path: Path, output_stride, device, providers=None, threads=None) -> ModelRunner:
    if device == "cuda":
        raise ModelFileError(f"{path}: this project runs OpenVINO IRs on the CPU, not on device cuda")
    runner = OpenVINORunner(path, threads=threads)
    return ModelRunner(runner, _openvino_info(path, output_stride, model=runner.model), numpy_io=True)


def _tensorrt_runner(path: Path, output_stride, device, providers=None, threads=None) -> ModelRunner:
    if device == "cpu":
        raise ModelFileError(f"{path}: a TensorRT engine runs on its GPU only, not on device cpu")
    info = _engine_info(path, output_stride)
    return ModelRunner(TensorRTRunner(path), info)


def _engine_info(path: Path, output_stride, data: Optional[dict] = None) -> ModelInfo:
    sidecar = read_sidecar(path, data[sidecar_path(path)] if data else None)
    info = _info_from_metadata(path, sidecar.get("metadata"), "tensorrt", output_stride)
    info.precision = str(sidecar.get("precision", info.precision))
    return info


# --------------------------------------------------------------------------------- every format, one table
@dataclass(frozen=True)
class ModelFormat:
    """One kind of model file the project writes: how it is recognised, the files that make it up (shipped
    together to every node), how its metadata is read without running it, and how a runner opens it."""

    name: str
    suffixes: tuple
    label: str  # how --help and error messages name it
    companions: Callable[[Path], list]  # files that must lie beside the main one, same folder
    read_info: Callable[..., ModelInfo]  # (path, output_stride, data=None) -> ModelInfo; data: {file: its bytes}
    open_runner: Callable[..., ModelRunner]  # (path, output_stride, device, providers, threads) -> ModelRunner
    exported: bool = True  # written by export/ (not a training checkpoint)


FORMATS = (
    ModelFormat("checkpoint", (".ckpt",), "a checkpoint (.ckpt)", lambda p: [], _checkpoint_info, _torch_runner,
                exported=False),
    ModelFormat("onnx", (".onnx",), "an ONNX file (.onnx: FP32, FP16 or INT8 Q/DQ)", lambda p: [], _onnx_info,
                _onnx_runner),
    ModelFormat("openvino", (".xml",), "an OpenVINO IR (.xml with its .bin beside it: FP32 or INT8)",
                lambda p: [p.with_suffix(".bin")], _openvino_info, _openvino_runner),
    ModelFormat("tensorrt", ENGINE_SUFFIXES, "a TensorRT engine you built (.engine with its .engine.json sidecar)",
                lambda p: [sidecar_path(p)], _engine_info, _tensorrt_runner),
)


def formats_help(exported_only: bool = False) -> str:
    """The model files a command takes, for --help: "a checkpoint (.ckpt), ..., or a TensorRT engine ..."."""
    labels = [f.label for f in FORMATS if f.exported or not exported_only]
    return ", ".join(labels[:-1]) + ", or " + labels[-1]


def format_of(path) -> ModelFormat:
    """The format of a model file, by suffix (an engine also by its sidecar); one line naming the file if none."""
    path = Path(path)
    suffix = path.suffix.lower()
    for fmt in FORMATS:
        if suffix in fmt.suffixes:
            return fmt
    if sidecar_path(path).is_file():
        return next(f for f in FORMATS if f.name == "tensorrt")
    raise ModelFileError(f"{path}: unknown model file type {path.suffix or '(no suffix)'!r}; expected "
                         f"{formats_help()}")


def model_files(path) -> list:
    """Every file that makes up the model at ``path``, the main file first: what is shipped to other nodes.
    A missing one is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    fmt = format_of(path)
    files = [path, *fmt.companions(path)]
    for f in files[1:]:
        if not f.is_file():
            raise ModelFileError(f"{path}: {fmt.label.split(' (')[0]} needs {f.name} beside it; it is missing")
    return files


def load_runner(path, *, output_stride: Optional[int] = None, device: Optional[str] = None,
                providers: Optional[Sequence[str]] = None, threads: Optional[int] = None) -> ModelRunner:
    """Open any model file the project writes (FORMATS), the one way every consumer does (evaluate, predict,
    bench, segment, serve). ``output_stride``: checkpoints run at it, exported files must have been exported at
    it. ``device``: "cpu" or "cuda" (default: cuda when torch sees a GPU). Errors are one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    return format_of(path).open_runner(path, output_stride, device, providers, threads)


def read_model_info(path, output_stride: Optional[int] = None) -> ModelInfo:
    """A model file's metadata without a GPU: what a driver checks before it ships the file to workers.
    Checkpoints are loaded on the CPU; exported files and engines are only read for their metadata."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    return format_of(path).read_info(path, output_stride)


# ------------------------------------------------------------------------------------ one model, read once
@dataclass(frozen=True)
class ModelHandle:
    """A model file read once where a command starts: its files' bytes, each file's sha256 and its metadata, all
    from that one read. Output claiming (its identity), shipping (its bytes) and the user's summary (``info``)
    take it instead of the path, so none of them reads the file again and all see the same bytes."""

    path: Path
    format: ModelFormat
    info: ModelInfo
    sha256: dict  # file name -> hex sha256 of its bytes, the main file first
    data: dict  # file name -> its bytes, as read (what shipping puts in the object store)

    @property
    def files(self) -> list:
        """Every file of the model, the main file first (companions lie in its folder)."""
        return [self.path.with_name(name) for name in self.sha256]


def open_model_file(path, output_stride: Optional[int] = None) -> ModelHandle:
    """Read every file of the model at ``path`` once (model_files) and take its sha256 and metadata from those
    bytes (a checkpoint through torch.load(weights_only=True), as read_model_info does); errors as read_model_info.
    The bytes stay in the handle: the driver holds the model once, as shipping it does."""
    path = Path(path)
    files = model_files(path)
    data = {f: f.read_bytes() for f in files}
    info = format_of(path).read_info(path, output_stride, data=data)
    return ModelHandle(path, format_of(path), info, {f.name: hashlib.sha256(d).hexdigest() for f, d in data.items()},
                       {f.name: d for f, d in data.items()})
