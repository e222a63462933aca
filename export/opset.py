"""Which ONNX opset an export may use: one the backend that reads the file parses.

The exporter writes what it is asked for; a backend that cannot parse it fails only when it loads the file
(TensorRT's parser after the export and the CPU-side precision files, minutes in). Checked up front, in one
line naming export.opset.
"""
from __future__ import annotations

import importlib
from typing import Optional

from deeplab.cli import UserError, error_line
from deeplab.config import ConfigError

# TensorRT 10.0's ONNX parser supports opsets 9-20 (onnx-tensorrt docs/operators.md); later TensorRT
# releases parse at least these, so 20 is the bound an engine built anywhere can rely on.
TENSORRT_MAX_OPSET = 20
BACKENDS = ("onnxruntime", "openvino", "tensorrt")


def exporter_default() -> int:
    """The opset torch.onnx.export writes when none is given."""
    from torch.onnx import _constants

    return int(_constants.ONNX_DEFAULT_OPSET)


def _identity_model(opset: int) -> bytes:
    """The smallest ONNX stamped with ``opset``: what a backend's loader accepts or refuses by version."""
    from onnx import TensorProto, helper

    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "opset_probe", value[:1], value[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # read by every supported onnxruntime/OpenVINO
    return model.SerializeToString()


def _backend_refuses(opset: int, backend: str) -> Optional[str]:
    """Why the installed ``backend`` will not load a model of this opset, or None."""
    if backend == "tensorrt":
        return None if opset <= TENSORRT_MAX_OPSET else f"TensorRT 10.0 parses opsets up to {TENSORRT_MAX_OPSET}"
    try:
        if backend == "onnxruntime":
            import onnxruntime as ort

            ort.InferenceSession(_identity_model(opset), providers=["CPUExecutionProvider"])
        else:
            import openvino

            openvino.Core().read_model(_identity_model(opset))
    except ImportError:
        return None  # not installed: nothing to check against here
    except Exception as e:
        version = getattr(importlib.import_module(backend), "__version__", "?")
        return f"the installed {backend} {version} does not load opset {opset} ({error_line(e, 120)})"
    return None


def _hint(backend: str) -> str:
    return f"use --opset {TENSORRT_MAX_OPSET} or lower" if backend == "tensorrt" else "use a lower --opset"


def check_opset(opset: Optional[int], backend: str) -> int:
    """The opset to export with for ``backend`` (None: the exporter's default, capped at what TensorRT
    parses); ConfigError in one line naming export.opset when the backend cannot parse it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; one of {BACKENDS}")
    chosen = opset
    if chosen is None:
        chosen = exporter_default()
        if backend == "tensorrt":
            chosen = min(chosen, TENSORRT_MAX_OPSET)
    problem = _backend_refuses(chosen, backend)
    if problem:
        raise ConfigError(f"export.opset={chosen}: {problem}; {_hint(backend)}", ("export.opset",))
    return chosen


def check_onnx_file(path, backend: str) -> None:
    """An ONNX file given to a converter: its opset must be one ``backend`` parses (UserError, one line)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return  # not an ONNX file: the converter's own reading says so in its words
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    problem = _backend_refuses(opset, backend)
    if problem:
        again = _hint(backend).replace("use", "export it again with", 1)
        raise UserError(f"{path}: ONNX opset {opset}: {problem}; {again}")
