"""Runners shared by predict, evaluate and bench: a TensorRT engine with torch CUDA tensors as its buffers
(no pycuda), an ONNX model in onnxruntime with execution providers tried in order, and an OpenVINO IR
compiled per input shape.

An engine runs only on the TensorRT version and GPU model that built it, so every engine has a JSON sidecar
(``model.engine.json``) recording both; `TensorRTRunner` refuses an engine whose sidecar disagrees with the
machine before TensorRT gets a chance to fail obscurely ("Version tag does not match").
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from deeplab.cli import UserError, error_line
from deeplab.config import ConfigError, to_plain
from deeplab.fileio import write_text_atomic

# onnxruntime providers, fastest first; the CPU provider is always last and always available.
DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
SIDECAR_KEYS = ("gpu_name", "compute_capability", "tensorrt_version")
ENGINE_HASH_KEY = "engine_sha256"  # the sidecar vouches for these exact engine bytes


class EngineError(UserError, ValueError):
    """A model file cannot run here (wrong GPU / TensorRT version, missing sidecar, no GPU, unreadable IR); one line."""


# ----------------------------------------------------------------------------------------------- sidecar
def sidecar_path(engine_path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_sidecar(engine_path, info: dict) -> Path:
    """Write the engine's sidecar JSON atomically; `info` must hold at least SIDECAR_KEYS."""
    missing = [k for k in SIDECAR_KEYS if k not in info]
    if missing:
        raise ValueError(f"sidecar for {engine_path} lacks {', '.join(missing)}")
    path = sidecar_path(engine_path)
    write_text_atomic(path, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(engine_path) -> dict:
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise EngineError(f"{engine_path}: no sidecar {path.name} next to the engine; rebuild it with "
                          "python -m export.to_tensorrt (the sidecar records the GPU and TensorRT version it needs)")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or any(k not in info for k in SIDECAR_KEYS):
        raise EngineError(f"{path}: sidecar must be a JSON object with {', '.join(SIDECAR_KEYS)}")
    return info


def check_engine_hash(engine_path, info: dict) -> None:
    """Refuse an engine whose bytes are not the ones its sidecar vouches for. An engine is code-like (TensorRT
    runs what it deserializes, plugins included), so only the file export.to_tensorrt wrote next to its sidecar
    runs: a replaced or tampered engine, or a sidecar from before the hash was recorded, is rebuilt instead."""
    from .metadata import file_sha256

    expected = info.get(ENGINE_HASH_KEY)
    if not expected:
        raise EngineError(f"{engine_path}: its sidecar records no {ENGINE_HASH_KEY}; run only engines you built: "
                          "rebuild it with python -m export.to_tensorrt")
    actual = file_sha256(engine_path)
    if actual != expected:
        raise EngineError(f"{engine_path}: sha256 {actual[:16]}... is not the {expected[:16]}... its sidecar "
                          "vouches for (replaced or changed since it was built); run only engines you built: "
                          "rebuild it with python -m export.to_tensorrt")


def check_sidecar(info: dict, current: dict, engine_path="engine") -> None:
    """Raise EngineError unless the engine was built for this GPU model, compute capability and TensorRT.

    `current` is `device_info()` on this machine (a dict with the same keys; None where unknown)."""
    if not current.get("gpu_name"):
        raise EngineError(f"{engine_path}: no CUDA GPU here; a TensorRT engine needs the GPU it was built for "
                          f"({info.get('gpu_name')})")
    if not current.get("tensorrt_version"):
        raise EngineError(f"{engine_path}: tensorrt is not installed; the engine needs TensorRT "
                          f"{info.get('tensorrt_version')} (pip install tensorrt=={info.get('tensorrt_version')})")
    wrong = []
    labels = {"gpu_name": "GPU", "compute_capability": "compute capability", "tensorrt_version": "TensorRT"}
    for key in SIDECAR_KEYS:
        if str(info.get(key)) != str(current.get(key)):
            wrong.append(f"{labels[key]} {info.get(key)} (here: {current.get(key)})")
    if wrong:
        raise EngineError(f"{engine_path}: built for {', '.join(wrong)}; an engine runs only where it was built: "
                          "rebuild it here with python -m export.to_tensorrt")


def device_info(device: int = 0) -> dict:
    """This machine's GPU model, compute capability and TensorRT version (None where absent)."""
    info = {"gpu_name": None, "compute_capability": None, "tensorrt_version": tensorrt_version()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu_name"] = torch.cuda.get_device_name(device)
            major, minor = torch.cuda.get_device_capability(device)
            info["compute_capability"] = f"{major}.{minor}"
    except Exception:  # a broken CUDA install reads as "no GPU"
        pass
    return info


def tensorrt_version() -> Optional[str]:
    try:
        import tensorrt as trt
    except Exception:
        return None
    return trt.__version__


# --------------------------------------------------------------------------------------------- TensorRT
# TensorRT DataType names -> torch dtypes (by name, so this table needs no tensorrt import).
TRT_TO_TORCH = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
                "INT32": "int32", "INT64": "int64", "BOOL": "bool"}


def torch_dtype_for(trt_dtype):
    """torch dtype for a tensorrt.DataType (or its name)."""
    import torch

    name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1]
    if name not in TRT_TO_TORCH:
        raise EngineError(f"engine tensor type {name} is not supported by this runner")
    return getattr(torch, TRT_TO_TORCH[name])


class TensorRTRunner:
    """Run a serialized engine on torch CUDA tensors: set_input_shape, set_tensor_address, execute_async_v3.

    One image input (N, 3, H, W) and one logits output, as export.to_onnx writes them."""

    def __init__(self, engine_path, device: int = 0, check: bool = True):
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise EngineError(f"{engine_path}: engine file not found")
        self.path = engine_path
        self.sidecar = read_sidecar(engine_path) if check or sidecar_path(engine_path).is_file() else {}
        if self.sidecar:
            check_engine_hash(engine_path, self.sidecar)
        if check:
            check_sidecar(self.sidecar, device_info(device), engine_path)
        import tensorrt as trt
        import torch

        self._trt, self._torch = trt, torch
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{engine_path}: TensorRT could not deserialize the engine (built by another "
                              "TensorRT version or for another GPU?); rebuild it here")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if len(self.inputs) != 1 or len(self.outputs) != 1:
            raise EngineError(f"{engine_path}: expected one input and one output, got {self.inputs} -> {self.outputs}")
        self.input_dtype = torch_dtype_for(self.engine.get_tensor_dtype(self.inputs[0]))
        self.output_dtype = torch_dtype_for(self.engine.get_tensor_dtype(self.outputs[0]))
        # its own stream: enqueueing on the legacy default stream makes TensorRT add device syncs to every call
        self.stream = torch.cuda.Stream(device=self.device)

    @staticmethod
    def outside_profile(sidecar: dict, shape) -> Optional[str]:
        """Why an input of ``shape`` (N, C, H, W) is outside the engine's optimization profile as its sidecar
        records it ({min, opt, max} or {fixed}), or None; no GPU needed, so callers can skip such inputs."""
        shapes = (sidecar or {}).get("shapes") or {}
        shape = tuple(int(d) for d in shape)
        if shapes.get("fixed"):
            fixed = tuple(shapes["fixed"])
            return None if shape == fixed else f"not the engine's static shape {'x'.join(map(str, fixed))}"
        if not (shapes.get("min") and shapes.get("max")):
            return None  # not recorded: TensorRT itself will say
        low, high = tuple(shapes["min"]), tuple(shapes["max"])
        if len(shape) == len(low) and all(a <= d <= b for a, d, b in zip(low, shape, high)):
            return None
        return f"outside the engine's profile {'x'.join(map(str, low))} to {'x'.join(map(str, high))}"

    def __call__(self, images):
        """images: (N, 3, H, W) tensor (any device); returns logits on the GPU, as the engine's output dtype."""
        torch = self._torch
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the input may still be written on the caller's stream
        with torch.cuda.stream(self.stream):
            x = images.to(self.device, self.input_dtype).contiguous()
            name_in, name_out = self.inputs[0], self.outputs[0]
            if not self.context.set_input_shape(name_in, tuple(x.shape)):
                raise EngineError(f"{self.path}: input shape {tuple(x.shape)} is "
                                  f"{self.outside_profile(self.sidecar, x.shape) or 'outside the engine profile'}")
            out = torch.empty(tuple(self.context.get_tensor_shape(name_out)), dtype=self.output_dtype,
                              device=self.device)
            self.context.set_tensor_address(name_in, x.data_ptr())
            self.context.set_tensor_address(name_out, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"{self.path}: execute_async_v3 failed")
        self.stream.synchronize()
        out.record_stream(caller)  # the caller uses it on its stream: not reused before that work is done
        return out


# TensorRT's engine inspector names each layer output's type inside a format text ("Row major linear FP32",
# "Channel major FP16 format where channel % 8 == 0", "Int8"); the first of these found names the precision.
_FORMAT_PRECISIONS = (("BF16", "bf16"), ("FP16", "fp16"), ("HALF", "fp16"), ("FP8", "fp8"), ("INT8", "int8"),
                      ("UINT8", "uint8"), ("INT32", "int32"), ("INT64", "int64"), ("BOOL", "bool"),
                      ("FP32", "fp32"), ("FLOAT", "fp32"))


def format_precision(text: str) -> str:
    upper = str(text).upper()
    return next((name for token, name in _FORMAT_PRECISIONS if token in upper), "unknown")


def precision_groups(engine_information: str) -> dict:
    """{layer type: {precision of its output: layers}} from the engine inspector's JSON
    (``get_engine_information(LayerInformationFormat.JSON)``). Only an engine built with
    ProfilingVerbosity.DETAILED lists types and formats; one that lists names only says so."""
    layers = json.loads(engine_information).get("Layers", [])
    if layers and all(isinstance(layer, str) for layer in layers):
        return {"unknown": {"layers listed by name only (not built with ProfilingVerbosity.DETAILED)": len(layers)}}
    groups: dict = {}
    for layer in layers:
        outputs = layer.get("Outputs") or [{}]
        precision = format_precision(outputs[0].get("Format/Datatype", ""))
        kind = groups.setdefault(layer.get("LayerType", "unknown"), {})
        kind[precision] = kind.get(precision, 0) + 1
    return groups


def engine_precisions(engine) -> dict:
    """The precision of every layer group of a deserialized engine (see precision_groups)."""
    import tensorrt as trt

    inspector = engine.create_engine_inspector()
    return precision_groups(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def require(module: str, what: str):
    """Import an optional runtime, or say in one line which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EngineError(f"{what} is not installed: pip install 'deeplabv3-ray[cpu]' (onnxruntime, OpenVINO, NNCF) "
                          "or, on a GPU machine, 'deeplabv3-ray[gpu]' (onnxruntime-gpu, TensorRT); not both") from None


# ------------------------------------------------------------------------------------------ onnxruntime
def available_providers() -> list:
    ort = require("onnxruntime", "onnxruntime")

    return list(ort.get_available_providers())


def pick_providers(wanted: Optional[Sequence[str]] = None, available: Optional[Sequence[str]] = None) -> list:
    """The wanted providers (default: TensorRT, CUDA, CPU) that this onnxruntime build has, in order."""
    wanted = list(wanted or DEFAULT_PROVIDERS)
    available = list(available if available is not None else available_providers())
    unknown = [p for p in wanted if not p.endswith("ExecutionProvider")]
    if unknown:
        raise ValueError(f"unknown onnxruntime provider(s) {', '.join(unknown)}; e.g. CPUExecutionProvider")
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise ValueError(f"none of the providers {', '.join(wanted)} is available; this onnxruntime has "
                         f"{', '.join(available)}")
    return chosen


def _ort_load_errors(ort) -> tuple:
    """The exception types onnxruntime raises for a file it cannot load (they derive from Exception only)."""
    state = ort.capi.onnxruntime_pybind11_state
    names = ("Fail", "InvalidProtobuf", "InvalidGraph", "InvalidArgument", "NoSuchFile", "NotImplemented")
    return (RuntimeError,) + tuple(getattr(state, n) for n in names if hasattr(state, n))


class OnnxRunner:
    """An ONNX model in onnxruntime. `providers` are tried in order; `.providers` says which ones loaded."""

    def __init__(self, onnx_path, providers: Optional[Sequence[str]] = None, threads: Optional[int] = None,
                 provider_options: Optional[dict] = None):
        """``provider_options``: {provider name: its options} (the TensorRT provider's engine cache and shape
        profile, see trt_provider_options)."""
        ort = require("onnxruntime", "onnxruntime")

        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"{onnx_path}: ONNX file not found")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.path = onnx_path
        try:
            options = provider_options or {}
            chosen = [(p, options[p]) if p in options else p for p in pick_providers(providers)]
            self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=chosen)
        except _ort_load_errors(ort) as e:
            raise EngineError(f"{onnx_path}: onnxruntime cannot load it ({error_line(e)})") from None
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name
        self.input_type = self.session.get_inputs()[0].type  # e.g. "tensor(float)" or "tensor(float16)"

    def bind(self, images: np.ndarray, device: str = "cuda"):
        """An I/O binding with ``images`` copied to ``device`` once (onnxruntime's OrtValue) and the output left
        there: ``session.run_with_iobinding(binding)`` then runs from device input to device output, no host
        copy timed (``binding.get_outputs()[0]``: the logits, an OrtValue on the device)."""
        ort = require("onnxruntime", "onnxruntime")

        dtype = np.float16 if self.input_type == "tensor(float16)" else np.float32
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(images, dtype), device, 0)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, value)
        binding.bind_output(self.session.get_outputs()[0].name, device)
        binding.value = value  # keeps the device input alive as long as the binding
        return binding

    def __call__(self, images) -> np.ndarray:
        """images: (N, 3, H, W) numpy array or CPU torch tensor; returns logits as float32 numpy."""
        x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
        x = x.astype(np.float16 if self.input_type == "tensor(float16)" else np.float32, copy=False)
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0]
        return out.astype(np.float32, copy=False)


def trt_provider_options(input_name: str, shapes: Sequence[tuple], cache_dir) -> dict:
    """onnxruntime's TensorRT provider options for inputs of ``shapes`` (NCHW): engines cached in ``cache_dir``
    (built once, reused by the next run) and one shape profile covering them (opt: the first), so the provider
    does not rebuild its engine when the input size changes."""
    def text(shape):
        return f"{input_name}:{'x'.join(str(int(d)) for d in shape)}"

    low = tuple(min(dims) for dims in zip(*shapes))
    high = tuple(max(dims) for dims in zip(*shapes))
    return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir), "trt_timing_cache_enable": True,
            "trt_profile_min_shapes": text(low), "trt_profile_opt_shapes": text(shapes[0]),
            "trt_profile_max_shapes": text(high)}


# ------------------------------------------------------------------------------------------- OpenVINO
OPENVINO_HINTS = ("latency", "throughput")
OPENVINO_PRECISIONS = ("f32", "bf16", "f16")


def _check_ir_root(path: Path) -> None:
    """Refuse an .xml that is not an IR before OpenVINO sees it: OpenVINO would offer it to every frontend it
    has (TensorFlow's parses text graphs through its own protobuf), which is slow, noisy and can crash."""
    import xml.etree.ElementTree as ET

    try:
        _, root = next(ET.iterparse(str(path), events=("start",)))
    except (ET.ParseError, StopIteration) as e:
        raise EngineError(f"{path}: not an OpenVINO IR (not well-formed XML: {e})") from None
    if root.tag != "net" or "version" not in root.attrib:
        raise EngineError(f"{path}: not an OpenVINO IR (its XML root is <{root.tag}>, not <net version=...>)")


class OpenVINORunner:
    """An OpenVINO IR (file or ov.Model) on the CPU. The CPU plugin is fastest on a static image size, so the
    model is reshaped and compiled once per image size and kept (the `cache` most recent sizes). The batch
    dimension stays dynamic: as fast as a static one here (R-50 INT8 at 129x129, batch 1 and 8: within 1.5%),
    and a server's batches of 1 to 8 images then need one compilation (0.2-0.4 s each), not eight.

    ``hint``: "latency" (one request at a time, all threads on it) or "throughput" (parallel streams).
    ``precision``: the inference precision of layers that are not int8: "f32" (exact; the default, since
    OpenVINO would otherwise pick bf16 on CPUs with AMX/avx512_bf16), "bf16" or "f16" where the CPU has them.
    """

    def __init__(self, model, threads: Optional[int] = None, hint: str = "latency", precision: str = "f32",
                 device: str = "CPU", cache: int = 8):
        ov = require("openvino", "OpenVINO")

        if hint not in OPENVINO_HINTS or precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"OpenVINO hint {hint!r} / precision {precision!r}: use one of {OPENVINO_HINTS} / "
                             f"{OPENVINO_PRECISIONS}")
        self.core = ov.Core()
        self.path = None
        if isinstance(model, ov.Model):
            model = model.clone()  # reshaping per input shape must not change the caller's model
        else:
            self.path = Path(model)
            model = self._read(self.path)
        self.model, self.device, self.cache = model, device, cache
        self.config = {"PERFORMANCE_HINT": hint.upper(), "INFERENCE_PRECISION_HINT": precision}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self._compiled = {}  # input shape -> infer request, least recently used first

    def _read(self, path: Path):
        if not path.is_file() or not path.with_suffix(".bin").is_file():
            raise EngineError(f"{path}: an OpenVINO IR needs {path.name} and {path.with_suffix('.bin').name} "
                              "side by side")
        _check_ir_root(path)
        try:
            return self.core.read_model(str(path), str(path.with_suffix(".bin")))
        except RuntimeError as e:
            raise EngineError(f"{path}: not a readable OpenVINO IR ({error_line(e)})") from None

    def request(self, shape: tuple):
        """The infer request compiled for this input's image size, any batch (compiled on first use)."""
        size = tuple(int(d) for d in shape[1:])
        request = self._compiled.pop(size, None)
        if request is None:
            if len(self._compiled) >= self.cache:
                self._compiled.pop(next(iter(self._compiled)))  # the least recently used size
            self.model.reshape({0: [-1, *size]})
            request = self.core.compile_model(self.model, self.device, self.config).create_infer_request()
        self._compiled[size] = request  # most recently used last
        return request

    def __call__(self, images) -> np.ndarray:
        """images: (N, 3, H, W) numpy array or CPU torch tensor; returns logits as float32 numpy."""
        x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
        x = np.ascontiguousarray(x, np.float32)
        request = self.request(x.shape)
        request.infer({0: x})
        return np.array(request.get_output_tensor(0).data, np.float32)  # a copy: the next call reuses the buffer


# ------------------------------------------------------------------------------------- any model, one way
from dataclasses import dataclass, fields  # noqa: E402  (kept with the code that uses it)

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
    from deeplab.data.imagenet import IMAGENET_MEAN, IMAGENET_STD

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
                  threads=None) -> ModelRunner:
    import torch

    from deeplab.checkpoint import load_checkpoint
    from deeplab.inference import model_predictor

    from .metadata import dataset_meta, file_sha256, project_version

    if threads:
        torch.set_num_threads(int(threads))
    device = _pick_device(device)
    ckpt = load_checkpoint(path)
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
                     source_sha256=file_sha256(path), project_version=project_version())

    predict = model_predictor(model, device=device)  # what deeplab.predict and evaluate run

    @torch.no_grad()
    def forward(x):
        return predict(x).float()

    return ModelRunner(forward, info)


def _checkpoint_info(path: Path, output_stride) -> ModelInfo:
    return _torch_runner(path, output_stride, "cpu").info


def _info_from_metadata(path: Path, meta: dict, backend: str, output_stride: Optional[int]) -> ModelInfo:
    """ModelInfo from the deeplab.* record that every exporter writes (export.metadata). A file written before a
    field existed gets its documented default and one warning line naming the missing fields."""
    from .metadata import RECORD_DEFAULTS, complete_metadata

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


def _onnx_info(path: Path, output_stride, backend: str = "onnxruntime") -> ModelInfo:
    import onnx

    from .metadata import read_metadata

    try:
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


def _openvino_info(path: Path, output_stride, model=None) -> ModelInfo:
    from .metadata import read_ir_metadata

    if model is None:
        model = OpenVINORunner(path).model  # one-line errors for a missing .bin or an unreadable IR
    return _info_from_metadata(path, read_ir_metadata(model), "openvino (CPU)", output_stride)


def _openvino_runner(path: Path, output_stride, device, providers=None, threads=None) -> ModelRunner:
    if device == "cuda":
        raise ModelFileError(f"{path}: this project runs OpenVINO IRs on the CPU, not on device cuda")
    runner = OpenVINORunner(path, threads=threads)
    return ModelRunner(runner, _openvino_info(path, output_stride, runner.model), numpy_io=True)


def _tensorrt_runner(path: Path, output_stride, device, providers=None, threads=None) -> ModelRunner:
    if device == "cpu":
        raise ModelFileError(f"{path}: a TensorRT engine runs on its GPU only, not on device cpu")
    info = _engine_info(path, output_stride)
    return ModelRunner(TensorRTRunner(path), info)


def _engine_info(path: Path, output_stride) -> ModelInfo:
    sidecar = read_sidecar(path)
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
    read_info: Callable[..., ModelInfo]  # (path, output_stride) -> ModelInfo
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
