"""The backend runners, one per engine: a TensorRT engine with torch CUDA tensors as its buffers (no pycuda), an
ONNX model in onnxruntime with execution providers tried in order, and an OpenVINO IR compiled per input shape;
with what each needs around it (the engine's sidecar, onnxruntime's providers, the engine's layer precisions).

They are apart from `export.model_file` (which file is which format, its metadata, one way to open any of them)
because exporters, the GPU check and bench drive a backend directly, with options no other caller needs.

An engine runs only on the TensorRT version and GPU model that built it, so every engine has a JSON sidecar
(``model.engine.json``) recording both; `TensorRTRunner` refuses an engine whose sidecar disagrees with the
machine before TensorRT gets a chance to fail obscurely ("Version tag does not match").
"""
from __future__ import annotations

import importlib
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from deeplab.cli import UserError, error_line
from deeplab.fileio import write_text_atomic

from .metadata import file_sha256

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


def read_sidecar(engine_path, data: Optional[bytes] = None) -> dict:
    """The engine's sidecar; ``data``: its bytes where the caller read them already."""
    path = sidecar_path(engine_path)
    if data is None and not path.is_file():
        raise EngineError(f"{engine_path}: no sidecar {path.name} next to the engine; rebuild it with "
                          "python -m export.to_tensorrt (the sidecar records the GPU and TensorRT version it needs)")
    try:
        info = json.loads(path.read_bytes() if data is None else data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or any(k not in info for k in SIDECAR_KEYS):
        raise EngineError(f"{path}: sidecar must be a JSON object with {', '.join(SIDECAR_KEYS)}")
    return info


def check_engine_hash(engine_path, info: dict) -> None:
    """Refuse an engine whose bytes are not the ones its sidecar vouches for. An engine is code-like (TensorRT
    runs what it deserializes, plugins included), so only the file export.to_tensorrt wrote next to its sidecar
    runs: a replaced or tampered engine, or a sidecar from before the hash was recorded, is rebuilt instead."""

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


def _check_ir_root(path: Path, data: Optional[bytes] = None) -> None:
    """Refuse an .xml that is not an IR before OpenVINO sees it: OpenVINO would offer it to every frontend it
    has (TensorFlow's parses text graphs through its own protobuf), which is slow, noisy and can crash.
    ``data``: the file's bytes where the caller read them already."""

    try:
        _, root = next(ET.iterparse(str(path) if data is None else io.BytesIO(data), events=("start",)))
    except (ET.ParseError, StopIteration) as e:
        raise EngineError(f"{path}: not an OpenVINO IR (not well-formed XML: {e})") from None
    if root.tag != "net" or "version" not in root.attrib:
        raise EngineError(f"{path}: not an OpenVINO IR (its XML root is <{root.tag}>, not <net version=...>)")


def read_ir(path: Path, xml: bytes, weights: bytes):
    """An ov.Model from an IR's bytes already read (the .xml's and the .bin's); one-line errors naming ``path``."""
    ov = require("openvino", "OpenVINO")

    _check_ir_root(path, xml)
    try:
        return ov.Core().read_model(xml.decode(), ov.Tensor(np.frombuffer(weights, np.uint8).copy()))
    except (RuntimeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not a readable OpenVINO IR ({error_line(e)})") from None


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
