"""Reduced-precision ONNX variants made on CPU, and their accuracy measured in onnxruntime before any GPU
sees them.

- INT8: explicit Q/DQ nodes from onnxruntime's ``quantize_static`` (QDQ format, int8 weights per output
  channel, int8 activations, symmetric: zero point 0 everywhere, which TensorRT requires), calibrated on
  images from the user's dataset (or the synthetic one). TensorRT 10 and 11 both build from this file.
- FP16 / BF16: NVIDIA ModelOpt AutoCast when it is installed (the path TensorRT 11 documents); FP16 falls
  back to onnxruntime's float16 converter (same algorithm as onnxconverter-common, already installed).
- `accuracy_report` runs FP32 and each variant on held-out labelled images and reports mIoU and the drop;
  `to_tensorrt` refuses an INT8 model that loses more than ``export.max_int8_miou_drop`` points.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, Sequence

import numpy as np
import torch

from deeplab.cli import UserError
from deeplab.fileio import atomic_path
from deeplab.inference import evaluate

from .cli import ExportError
from .cpu import has_vnni
from .metadata import read_metadata, set_metadata
from .runners import OnnxRunner

log = logging.getLogger(__name__)


class PrecisionError(UserError, ValueError):
    """A reduced-precision model this machine or these settings cannot make; one line saying what to install
    or change."""


# ----------------------------------------------------------------------------------------------- INT8
def _calibration_reader(input_name: str, arrays: Sequence[np.ndarray]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Feeds calibration batches (N x 3 x H x W float32) to onnxruntime's calibrator one at a time."""

        def __init__(self):
            self._it = iter(arrays)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {input_name: np.ascontiguousarray(x, np.float32)}

        def rewind(self):
            self._it = iter(arrays)

    return Reader()


def cpu_reduce_range() -> bool:
    """7-bit weights for onnxruntime on this CPU: needed without VNNI, where u8 x s8 products saturate."""

    return not has_vnni()


def quantize_int8(src, dst, calib: Sequence[np.ndarray], per_channel: bool = True, symmetric: bool = True,
                  method: str = "minmax", reduce_range: bool = False) -> Path:
    """FP32 ONNX -> INT8 Q/DQ ONNX (int8 weights per channel, int8 activations, zero points 0), atomically.

    ``reduce_range``: 7-bit weights, for onnxruntime on a CPU without VNNI (`cpu_reduce_range()`); a GPU
    (TensorRT) wants the full 8 bits. The choice and the CPU's VNNI are recorded in the metadata."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise PrecisionError(f"calibration method {method!r} unknown; use one of {', '.join(methods)}")
    if not calib:
        raise PrecisionError("INT8 calibration needs at least one image")
    src, dst = Path(src), Path(dst)
    input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    t0 = time.time()
    images = int(sum(len(a) for a in calib))
    log.info(f"calibrating INT8 on {images} image(s) ({method}, {'per-channel' if per_channel else 'per-tensor'} "
             f"{'7-bit' if reduce_range else '8-bit'} weights, {'symmetric' if symmetric else 'asymmetric'})...")
    root = logging.getLogger()
    level = root.level
    with atomic_path(dst) as tmp:
        try:
            # quantize_static logs a root WARNING suggesting quant_pre_process, whose symbolic shape inference
            # cannot handle the dynamic Resize of this model ("Incomplete symbolic shape inference"): silence it
            root.setLevel(logging.ERROR)
            quantize_static(str(src), str(tmp), _calibration_reader(input_name, calib), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method], reduce_range=reduce_range,
                            # biases stay float: TensorRT dequantizes only 8-bit (and lower) tensors, not int32
                            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                                           "QuantizeBias": False})
        finally:
            root.setLevel(level)
        model = onnx.load(str(tmp))
        meta = read_metadata(model)  # quantize_static keeps the source's metadata_props; add how this was made
        meta.update(precision="int8", quantization={"format": "QDQ", "per_channel": per_channel,
                                                    "symmetric": symmetric, "method": method,
                                                    "calibration_images": images, "reduce_range": reduce_range,
                                                    "cpu_vnni": not cpu_reduce_range()})
        set_metadata(model, meta)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
    log.info(f"wrote {dst} in {time.time() - t0:.1f}s")
    return dst


# ----------------------------------------------------------------------------------------------- FP16 / BF16
def modelopt_autocast():
    """modelopt.onnx.autocast.convert_to_mixed_precision, or None where ModelOpt is not installed."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except Exception:
        return None
    return convert_to_mixed_precision


def lowp_onnx(src, dst, precision: str = "fp16", backend: str = "auto") -> tuple:
    """FP32 ONNX -> FP16 or BF16 ONNX with float32 inputs/outputs; returns (path, backend used).

    backend: "modelopt" (AutoCast; FP16 or BF16), "onnxruntime" (FP16 only) or "auto" (ModelOpt if present)."""
    import onnx

    if precision not in ("fp16", "bf16"):
        raise PrecisionError(f"precision {precision!r}: use fp16 or bf16")
    autocast = modelopt_autocast() if backend in ("auto", "modelopt") else None
    if backend == "modelopt" and autocast is None:
        raise PrecisionError("ModelOpt is not installed (pip install 'nvidia-modelopt[onnx]'); it provides AutoCast")
    if autocast is None and precision == "bf16":
        raise PrecisionError("a BF16 ONNX needs ModelOpt AutoCast (pip install 'nvidia-modelopt[onnx]'); "
                         "onnxruntime's converter does FP16 only")
    src, dst = Path(src), Path(dst)
    meta = read_metadata(src)
    if autocast is not None:
        model = autocast(onnx_path=str(src), low_precision_type=precision, keep_io_types=True)
        used = "modelopt.autocast"
    else:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # Resize stays fp32: its scales/sizes inputs must not be cast, and upsampling is cheap anyway
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=["Resize"])
        _toposort(model.graph)  # the converter appends its input casts at the end; the checker wants order
        used = "onnxruntime.float16"
    meta.update(precision=precision, precision_converter=used)
    set_metadata(model, meta)
    onnx.checker.check_model(model)
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
    log.info(f"wrote {dst} ({precision} via {used})")
    return dst, used


def _toposort(graph) -> None:
    """Reorder graph.node so every node comes after the producers of its inputs (Kahn's algorithm)."""
    produced_by = {out: i for i, n in enumerate(graph.node) for out in n.output}
    deps = [{produced_by[x] for x in n.input if x in produced_by} for n in graph.node]
    order, done = [], set()
    pending = list(range(len(graph.node)))
    while pending:
        ready = [i for i in pending if deps[i] <= done]
        if not ready:
            raise ValueError("ONNX graph has a cycle")
        order += ready
        done.update(ready)
        pending = [i for i in pending if i not in done]
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


# ----------------------------------------------------------------------------------------------- accuracy
def _recording(predict: Callable, preds: list) -> Callable:
    """`predict` that also keeps each batch's label map, for pixel agreement between backends."""
    def run(images):
        logits = predict(images)
        preds.append(torch.as_tensor(logits).argmax(1).cpu())
        return logits

    return run


def accuracy_report(models: Dict[str, object], batches: Sequence, num_classes: int, ignore_index: int = 255,
                    reference: str = "fp32") -> dict:
    """mIoU (percent) of each named ONNX file or predict callable on the same labelled batches, its drop
    against `reference`, and the fraction of pixels whose label agrees with `reference`'s."""
    results, ref_preds = {}, None
    for name in [reference] + [k for k in models if k != reference]:
        model = models[name]
        predict = model if callable(model) else OnnxRunner(model, ["CPUExecutionProvider"])
        preds = []
        t0 = time.time()
        miou = 100 * evaluate(_recording(predict, preds), batches, num_classes, ignore_index).miou()
        ref_preds = preds if ref_preds is None else ref_preds
        same = sum(int((p == r).sum()) for p, r in zip(preds, ref_preds))
        results[name] = {"miou": miou, "agreement": same / max(1, sum(p.numel() for p in preds))}
        log.info(f"  {name:>6}: mIoU {miou:.2f} on {len(batches)} image(s)"
                 + (f", {100 * results[name]['agreement']:.2f}% pixels agree with {reference}"
                    if name != reference else "") + f" ({time.time() - t0:.1f}s)")
    for name in results:
        results[name]["miou_drop"] = results[reference]["miou"] - results[name]["miou"]
    return results


def gate_int8(report: dict, max_drop: float, force: bool) -> None:
    """Refuse an INT8 model that loses more than `max_drop` mIoU points against FP32 (ExportError: nothing is
    written), or only warn with --force."""
    drop = report["int8"]["miou_drop"]
    if drop > max_drop:
        msg = (f"INT8 loses {drop:.2f} mIoU points (> export.max_int8_miou_drop={max_drop}); calibrate on more / "
               "more typical images (--calib-images, --calib-data) or pass --force")
        if not force:
            raise ExportError(msg)
        log.info(f"warning: {msg}; writing it anyway (--force)")
