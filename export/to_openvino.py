"""Checkpoint or ONNX -> OpenVINO IR (model.xml + model.bin), FP32 or INT8, checked before it takes its name.

    python -m export.to_openvino best.ckpt -o model.xml                          # FP32, parity vs PyTorch
    python -m export.to_openvino best.ckpt -o model.int8.xml --precision int8    # NNCF post-training INT8

The IR is converted from the project's ONNX (a checkpoint is exported first, into a temporary file), with the
same ``deeplab.*`` metadata in its rt_info, weights kept in FP32, and input batch, height and width dynamic
(the runner compiles one static shape per input size). FP32 is checked against PyTorch (or, for an ONNX
source, onnxruntime) at two sizes. INT8 is NNCF post-training quantization on calibration images from the
config's data (or ``--calib-data FOLDER``), with NNCF's overflow fix on every layer when this CPU has no
VNNI (int8 products would saturate); when labelled validation images load, ``quantize_with_accuracy_control``
keeps the layers that cost accuracy in FP32, and the result is refused (nothing written) when it still loses
more than ``export.max_int8_miou_drop`` mIoU points, unless ``--force``. xml and bin are written under
temporary names and renamed bin first, xml last.
"""
from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from deeplab.cli import UserError, command, error_line
from deeplab.config import Alias
from deeplab.fileio import atomic_path, ensure_dir

from .cli import parse_and_run, say_unwritten_on_stop, source_and_config, source_parser
from .cpu import has_vnni
from .metadata import read_ir_metadata, read_metadata, set_ir_metadata
from .runners import OnnxRunner, OpenVINORunner, require

log = logging.getLogger("export.to_openvino")  # not __name__: run as -m it would be __main__, outside "export"
PRECISIONS = ("fp32", "int8")


def convert(onnx_path, meta: dict):
    """The ONNX as an ov.Model with `meta` in its rt_info (batch, height and width stay dynamic)."""
    ov = require("openvino", "OpenVINO")
    model = ov.Core().read_model(str(onnx_path))
    set_ir_metadata(model, meta)
    return model


def save_ir(model, xml_path) -> Path:
    """Write xml + bin atomically (FP32 weights): both under temporary names with one stem, renamed bin first
    and xml last, so a reader that finds the xml finds its weights."""
    import openvino as ov

    xml_path = Path(xml_path)
    with atomic_path(xml_path) as tmp_xml, atomic_path(xml_path.with_suffix(".bin")) as tmp_bin:
        assert tmp_bin == tmp_xml.with_suffix(".bin")  # save_model names the bin after the xml
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
    return xml_path


def ir_parity(reference, model, inputs) -> list:
    """`reference` (images -> logits) vs the IR in OpenVINO (f32 inference) on each input batch."""
    from .to_onnx import compare

    runner = OpenVINORunner(model, precision="f32")
    return [compare(reference(x), runner(x), x.shape, "OpenVINO") for x in inputs]


# ----------------------------------------------------------------------------------------------- INT8
def overflow_fix():
    """NNCF's overflow fix: on every layer without VNNI (u8 x s8 pairs saturate in int16), else the default."""
    from nncf.quantization.advanced_parameters import OverflowFix

    return OverflowFix.FIRST_LAYER if has_vnni() else OverflowFix.ENABLE


def miou_of(compiled, batches, num_classes: int, ignore_index: int) -> float:
    """mIoU (percent) of a compiled OpenVINO model (or any images -> logits callable) on labelled batches."""
    from deeplab.inference import evaluate

    def predict(images):
        return next(iter(compiled(np.ascontiguousarray(images.numpy())).values()))

    return 100 * evaluate(predict, batches, num_classes, ignore_index).miou()


def quantize(model, calib: list, val_batches: Optional[list], max_drop: float, num_classes: int,
             ignore_index: int = 255) -> tuple:
    """NNCF INT8 of an ov.Model; returns (int8 model, quantization record for the metadata)."""
    nncf = require("nncf", "NNCF")
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    fix = overflow_fix()
    params = AdvancedQuantizationParameters(overflow_fix=fix)
    calibration = nncf.Dataset(calib)
    record = {"tool": f"nncf {nncf.__version__}", "calibration_images": len(calib), "overflow_fix": fix.value,
              "cpu_vnni": has_vnni(), "accuracy_control": val_batches is not None}
    t0 = time.time()
    if val_batches is None:
        log.info(f"quantizing to INT8 with NNCF on {len(calib)} calibration image(s) (overflow fix: {fix.value}); "
                 "no labelled validation images, so no accuracy control...")
        int8 = nncf.quantize(model, calibration, subset_size=len(calib), advanced_parameters=params)
    else:
        log.info(f"quantizing to INT8 with NNCF accuracy control on {len(calib)} calibration and "
                 f"{len(val_batches)} validation image(s), max drop {max_drop} mIoU (overflow fix: {fix.value})...")
        int8 = nncf.quantize_with_accuracy_control(
            model, calibration, nncf.Dataset(val_batches, lambda item: item[0].numpy()),
            lambda compiled, items: miou_of(compiled, list(items), num_classes, ignore_index),
            max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib),
            advanced_quantization_parameters=params)
    log.info(f"quantized in {time.time() - t0:.1f}s")
    return int8, record


def int8_gate(fp32_model, int8_model, val_batches: list, cfg, force: bool) -> dict:
    """FP32 vs INT8 IR mIoU through the one evaluator; refuses a drop above export.max_int8_miou_drop."""
    from .precision import accuracy_report, gate_int8

    meta_classes = int(read_ir_metadata(fp32_model)["num_classes"])
    report = accuracy_report({"fp32": OpenVINORunner(fp32_model, precision="f32"),
                              "int8": OpenVINORunner(int8_model, precision="f32")},
                             val_batches, meta_classes, cfg.data.ignore_index)
    gate_int8(report, cfg.export.max_int8_miou_drop, force)
    return report


# ----------------------------------------------------------------------------------------------- command
def source_onnx(src: Path, ckpt, cfg, workdir: Path) -> tuple:
    """(ONNX path, reference images -> logits callable) for the source: a checkpoint is exported into
    `workdir` and referenced by PyTorch; an ONNX file is referenced by onnxruntime."""
    import torch

    from .to_onnx import export_checkpoint

    if ckpt is None:
        return src, OnnxRunner(src, ["CPUExecutionProvider"])
    ex = cfg.export
    onnx_path, _, _ = export_checkpoint(ckpt, workdir / "model.onnx", ex.output_stride, True, ex.opset,
                                        tolerance=ex.tolerance, data_cfg=cfg.data)

    @torch.no_grad()
    def reference(x):
        return ckpt.model(torch.as_tensor(x)).float().numpy()

    return onnx_path, reference


def check_fp32(model, reference, cfg) -> list:
    from .samples import parity_inputs
    from .to_onnx import check_parity, log_parity

    rows = ir_parity(reference, model, parity_inputs((97, 65), 2, cfg.data))
    log_parity(rows)
    check_parity(rows, cfg.export.tolerance, "OpenVINO IR", "OpenVINO")
    return rows


def make_int8(model, cfg, args) -> tuple:
    """The INT8 model, its quantization record and (with labelled data) the accuracy report."""
    from .samples import calibration_images, labelled_batches

    ex, data = cfg.export, cfg.data
    calib = calibration_images(data, ex.calib_images, ex.image_size if args.calib_data else None, args.calib_data)
    try:
        val = labelled_batches(data, data.val_split, ex.accuracy_images) if ex.accuracy_images else None
    except ValueError as e:
        log.info(f"note: no labelled validation images ({error_line(e, 160)}): accuracy not checked")
        val = None
    num_classes = int(read_ir_metadata(model)["num_classes"])
    int8, record = quantize(model, calib, val, ex.max_int8_miou_drop, num_classes, data.ignore_index)
    report = int8_gate(model, int8, val, cfg, args.force) if val is not None else None
    return int8, record, report


def run(args) -> int:
    src, ckpt, cfg = source_and_config(args, "openvino")
    precision = cfg.export.precision
    if precision not in PRECISIONS:
        raise UserError(f"export.precision={precision!r}: an OpenVINO IR is fp32 or int8 (bf16/fp16 are runtime "
                        "hints: the runner uses them where the CPU has them)")
    out = Path(args.output) if args.output else src.with_suffix(".xml" if precision == "fp32" else ".int8.xml")
    ensure_dir(out.parent)
    say_unwritten_on_stop(out)
    with tempfile.TemporaryDirectory(prefix=".to_openvino.", dir=out.parent) as workdir:
        onnx_path, reference = source_onnx(src, ckpt, cfg, Path(workdir))
        meta = read_metadata(onnx_path)
        if "num_classes" not in meta:
            raise UserError(f"{onnx_path}: no deeplab.* metadata; export it with python -m export.to_onnx")
        meta.update(precision="fp32", runtime="openvino")
        model = convert(onnx_path, meta)
        log.info(f"converted {onnx_path.name} to OpenVINO IR; parity against "
                 f"{'PyTorch' if ckpt is not None else 'onnxruntime'}:")
        meta["parity"] = check_fp32(model, reference, cfg)
        if precision == "int8":
            model, meta["quantization"], meta["accuracy"] = make_int8(model, cfg, args)
            meta["precision"] = "int8"
        set_ir_metadata(model, meta)
        save_ir(model, out)
    print(f"wrote {out} and {out.with_suffix('.bin').name} ({out.with_suffix('.bin').stat().st_size / 2**20:.1f} MiB, "
          f"{precision}, output stride {meta.get('output_stride')}, {meta['num_classes']} classes)")
    return 0


ALIASES = [Alias("--precision", "export.precision", "fp32 or int8"),
           Alias("--output-stride", "export.output_stride", "inference output stride, for a checkpoint"),
           Alias("--calib-images", "export.calib_images", "INT8 calibration images"),
           Alias("--accuracy-images", "export.accuracy_images",
                 "labelled val images for INT8 accuracy control and the gate (0: no gate)"),
           Alias("--tolerance", "export.tolerance", "FP32 parity: max |logit diff| / max(1, |largest logit|)")]


@command
def main(argv=None) -> int:
    p = source_parser("python -m export.to_openvino", __doc__.split("\n\n")[0],
                      "IR to write as MODEL.xml, its weights beside it as MODEL.bin (default: SOURCE.xml / "
                      "SOURCE.int8.xml)", "write an INT8 IR even if it loses more than export.max_int8_miou_drop")
    return parse_and_run(p, ALIASES, argv, run)

if __name__ == "__main__":
    sys.exit(main())
