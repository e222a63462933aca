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
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .runtime import progress

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ----------------------------------------------------------------------------------------------- data
def dataset_meta(data_cfg, num_classes: int):
    """(class names or None, mean, std) for the ONNX metadata, from the data package when it knows them."""
    from deeplab.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    names = None
    if data_cfg is not None:
        try:
            from deeplab.data import dataset_info

            names = list(dataset_info(data_cfg).class_names)
        except Exception:  # an unreachable dataset root must not stop an export: names are cosmetic
            names = None
    if names and len(names) != num_classes:
        names = None
    return names, IMAGENET_MEAN, IMAGENET_STD


def load_dataset(data_cfg, split: str):
    """The data package's evaluation dataset: items are (image 3xHxW normalized float32, mask HxW int64)."""
    from deeplab.data import build_dataset

    return build_dataset(data_cfg, split, train=False)


def labelled_samples(data_cfg, split: str, n: int, start: int = 0) -> list:
    """Up to n (image 1x3xHxW float32 numpy, mask HxW int64 numpy) pairs at the images' own size."""
    ds = load_dataset(data_cfg, split)
    out = []
    for i in range(start, min(len(ds), start + n)):
        image, mask = ds[i][:2]
        out.append((torch.as_tensor(image).unsqueeze(0).float().numpy(), torch.as_tensor(mask).long().numpy()))
    if not out:
        raise ValueError(f"data split {split!r} has no images for calibration/accuracy")
    return out


def sample_images(data_cfg, split: str, n: int, size: int) -> Optional[torch.Tensor]:
    """n real images resized to size x size (bilinear, normalized), or None if the dataset does not load."""
    try:
        samples = labelled_samples(data_cfg, split, n)
    except Exception:
        return None
    x = torch.cat([torch.from_numpy(img) for img, _ in samples])
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if len(x) < n:
        x = x.repeat((n + len(x) - 1) // len(x), 1, 1, 1)[:n]
    return x


def folder_images(folder, n: int, size: int, mean, std) -> list:
    """Calibration images from a plain folder (no labels): n files, resized to size x size, normalized."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--calib-data {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
    if not files:
        raise ValueError(f"--calib-data {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    m = np.asarray(mean, np.float32).reshape(3, 1, 1)
    s = np.asarray(std, np.float32).reshape(3, 1, 1)
    out = []
    for f in files:
        try:
            img = Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{f}: not a readable image ({e})") from None
        x = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
        out.append(((x - m) / s)[None].astype(np.float32))
    return out


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


def quantize_int8(src, dst, calib: Sequence[np.ndarray], per_channel: bool = True, symmetric: bool = True,
                  method: str = "minmax", log: Callable = progress) -> Path:
    """FP32 ONNX -> INT8 Q/DQ ONNX (int8 weights per channel, int8 activations, zero points 0)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise ValueError(f"calibration method {method!r} unknown; use one of {', '.join(methods)}")
    if not calib:
        raise ValueError("INT8 calibration needs at least one image")
    src, dst = Path(src), Path(dst)
    input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    tmp = dst.with_name(f".{dst.name}.tmp.onnx")
    t0 = time.time()
    log(f"calibrating INT8 on {sum(len(a) for a in calib)} image(s) ({method}, "
        f"{'per-channel' if per_channel else 'per-tensor'} weights, {'symmetric' if symmetric else 'asymmetric'})...")
    root = logging.getLogger()
    level = root.level
    try:
        # quantize_static logs a root WARNING suggesting quant_pre_process, whose symbolic shape inference
        # cannot handle the dynamic Resize of this model ("Incomplete symbolic shape inference"): silence it
        root.setLevel(logging.ERROR)
        quantize_static(str(src), str(tmp), _calibration_reader(input_name, calib), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method],
                        # biases stay float: TensorRT dequantizes only 8-bit (and lower) tensors, not int32
                        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                                       "QuantizeBias": False})
        root.setLevel(level)
        model = onnx.load(str(tmp))
        # quantize_static keeps the source's metadata_props; record how this file was made
        from .to_onnx import read_metadata, set_metadata

        meta = read_metadata(model)
        meta.update(precision="int8", quantization={"format": "QDQ", "per_channel": per_channel,
                                                    "symmetric": symmetric, "method": method,
                                                    "calibration_images": int(sum(len(a) for a in calib))})
        set_metadata(model, meta)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
        tmp.replace(dst)
    finally:
        root.setLevel(level)
        tmp.unlink(missing_ok=True)
        for extra in dst.parent.glob(f".{dst.name}.tmp*"):
            extra.unlink(missing_ok=True)
    log(f"wrote {dst} in {time.time() - t0:.1f}s")
    return dst


def qdq_summary(onnx_path) -> dict:
    """Q/DQ node counts and the zero points that are not 0 (TensorRT accepts only symmetric, zero point 0)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consts = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    nonzero, dtypes, per_channel = [], set(), 0
    for n in q + dq:
        if len(n.input) > 2:
            zp = inits.get(n.input[2], consts.get(n.input[2]))
            if zp is not None:
                dtypes.add(str(zp.dtype))
                if np.any(zp != 0):
                    nonzero.append(n.name)
        scale = inits.get(n.input[1], consts.get(n.input[1]))
        if scale is not None and scale.size > 1:
            per_channel += 1
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return {"quantize": len(q), "dequantize": len(dq), "nonzero_zero_points": sorted(set(nonzero)),
            "zero_point_dtypes": sorted(dtypes), "per_channel_nodes": per_channel, "conv": len(convs)}


# ----------------------------------------------------------------------------------------------- FP16 / BF16
def modelopt_autocast():
    """modelopt.onnx.autocast.convert_to_mixed_precision, or None where ModelOpt is not installed."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except Exception:
        return None
    return convert_to_mixed_precision


def lowp_onnx(src, dst, precision: str = "fp16", backend: str = "auto", log: Callable = progress) -> tuple:
    """FP32 ONNX -> FP16 or BF16 ONNX with float32 inputs/outputs; returns (path, backend used).

    backend: "modelopt" (AutoCast; FP16 or BF16), "onnxruntime" (FP16 only) or "auto" (ModelOpt if present)."""
    import onnx

    if precision not in ("fp16", "bf16"):
        raise ValueError(f"precision {precision!r}: use fp16 or bf16")
    autocast = modelopt_autocast() if backend in ("auto", "modelopt") else None
    if backend == "modelopt" and autocast is None:
        raise ValueError("ModelOpt is not installed (pip install 'nvidia-modelopt[onnx]'); it provides AutoCast")
    if autocast is None and precision == "bf16":
        raise ValueError("a BF16 ONNX needs ModelOpt AutoCast (pip install 'nvidia-modelopt[onnx]'); "
                         "onnxruntime's converter does FP16 only")
    src, dst = Path(src), Path(dst)
    from .to_onnx import read_metadata, set_metadata

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
    tmp = dst.with_name(f".{dst.name}.tmp.onnx")
    try:
        onnx.save(model, str(tmp))
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"wrote {dst} ({precision} via {used})")
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
def evaluate(predict: Callable, samples: Sequence, num_classes: int, ignore_index: int = 255,
             reference: Optional[List[np.ndarray]] = None) -> dict:
    """mIoU of `predict` (1x3xHxW -> 1xCxHxW logits) on labelled samples, plus its argmax agreement with
    `reference` label maps when given. Returns {"miou": percent, "agreement": fraction, "preds": [...]}."""
    from deeplab import ConfusionMatrix

    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    preds, agree, total = [], 0, 0
    for i, (image, mask) in enumerate(samples):
        logits = predict(image)
        logits = logits.detach().float().cpu().numpy() if hasattr(logits, "detach") else np.asarray(logits)
        pred = logits.argmax(1)[0]
        preds.append(pred)
        cm.update(torch.from_numpy(pred[None]), torch.from_numpy(np.asarray(mask)[None]))
        if reference is not None:
            agree += int((pred == reference[i]).sum())
            total += pred.size
    return {"miou": 100 * cm.miou(), "agreement": agree / total if total else 1.0, "preds": preds}


def accuracy_report(models: Dict[str, object], samples: Sequence, num_classes: int, ignore_index: int = 255,
                    reference: str = "fp32", log: Callable = progress) -> dict:
    """Evaluate each named ONNX file (or callable) on the same samples; mIoU and drop vs `reference`."""
    from .runtime import OnnxRunner

    results, ref_preds = {}, None
    order = [reference] + [k for k in models if k != reference]
    for name in order:
        m = models[name]
        predict = m if callable(m) else OnnxRunner(m, ["CPUExecutionProvider"])
        t0 = time.time()
        r = evaluate(predict, samples, num_classes, ignore_index, ref_preds)
        if name == reference:
            ref_preds = r["preds"]
        results[name] = {"miou": r["miou"], "agreement": r["agreement"]}
        log(f"  {name:>6}: mIoU {r['miou']:.2f} on {len(samples)} image(s)"
            + (f", {100 * r['agreement']:.2f}% pixels agree with {reference}" if name != reference else "")
            + f" ({time.time() - t0:.1f}s)")
    for name in results:
        results[name]["miou_drop"] = results[reference]["miou"] - results[name]["miou"]
    return results
