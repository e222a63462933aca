"""Checkpoint -> one self-contained ONNX file at the inference output stride, checked against PyTorch.

    python -m export.to_onnx best.ckpt -o model.onnx --output-stride 8

The model is rebuilt from the checkpoint alone, in eval mode (BatchNorm folded into the convs by the
exporter), and batch, height and width are dynamic unless ``--static``.
The ONNX's metadata_props carry what a runtime needs to use it without the checkpoint: classes, class names,
output stride, align_corners, precision, rates, the source checkpoint's sha256 (export.metadata.RECORD_DEFAULTS).
The file is written under a temporary name, checked (onnx.checker, then onnxruntime against PyTorch: max absolute
logit difference and argmax agreement) and only then renamed into place.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from deeplab.checkpoint import Checkpoint, load_checkpoint
from deeplab.cli import command
from deeplab.config import Alias, add_config_args, config_from_args
from deeplab.fileio import atomic_path, ensure_dir

from .cli import ExportError, SwitchOff, say_unwritten_on_stop, show_progress
from .metadata import INPUT_NAME, OUTPUT_NAME, build_metadata, dataset_meta, file_sha256, set_metadata
from .opset import check_opset
from .runners import OnnxRunner
from .samples import parity_inputs

log = logging.getLogger("export.to_onnx")  # not __name__: run as -m it would be __main__, outside "export"
MIN_ARGMAX_AGREEMENT = 0.99  # ties between near-equal logits may flip a few pixels; more is a real mismatch


def prepare_model(model: nn.Module, output_stride: Optional[int] = None) -> nn.Module:
    """The model in eval mode (BatchNorm is then folded into the convs) at the inference output stride."""
    if output_stride and hasattr(model, "set_output_stride"):
        model.set_output_stride(output_stride)
    return model.eval()


# ------------------------------------------------------------------------------------------ export
def _dynamo_export(model, example, path, dynamic, opset):
    from torch.export import Dim

    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], external_data=False, dynamo=True,
                  verbose=False)
    if opset:
        kwargs["opset_version"] = opset
    if dynamic:
        kwargs["dynamic_shapes"] = {INPUT_NAME: {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")}}
    # the exporter logs one line per torchvision op it cannot register and a FutureWarning from pytree
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(model, (example,), str(path), **kwargs)


def export_model(model: nn.Module, path, meta: dict, example: Optional[torch.Tensor] = None,
                 dynamic: bool = True, opset: Optional[int] = None) -> Path:
    """Export an eval-mode model to `path` (one file, metadata embedded, onnx.checker passed), atomically.

    The example batch has 2 images: the exporter specializes size-1 dimensions, so a batch of 1 would
    make the batch dimension static."""
    import onnx

    if example is None:
        example = torch.randn(2, 3, 65, 65)
    with atomic_path(path) as tmp:
        with torch.no_grad():
            _dynamo_export(model, example, tmp, dynamic, opset)
        onnx_model = onnx.load(str(tmp))
        set_metadata(onnx_model, meta)
        onnx.checker.check_model(onnx_model, full_check=True)
        onnx.save(onnx_model, str(tmp))
    return Path(path)


def compare(ref: np.ndarray, out: np.ndarray, shape, runtime: str = "onnxruntime") -> dict:
    """One parity row: max |logit diff|, max |logit| of the reference, argmax agreement."""
    if out.shape != ref.shape:
        raise ExportError(f"{runtime} output shape {out.shape} != reference {ref.shape} for input {tuple(shape)}")
    return {"shape": list(shape), "max_abs_diff": float(np.abs(out - ref).max()),
            "max_abs_logit": float(np.abs(ref).max()),
            "argmax_agreement": float((out.argmax(1) == ref.argmax(1)).mean())}


def parity(model: nn.Module, onnx_path, inputs: Sequence[torch.Tensor], providers=None) -> list:
    """PyTorch vs onnxruntime on each input batch."""
    runner = OnnxRunner(onnx_path, providers or ["CPUExecutionProvider"])
    rows = []
    for x in inputs:
        with torch.no_grad():
            rows.append(compare(model(x).float().numpy(), runner(x), x.shape))
    return rows


def check_parity(rows: list, tolerance: float, where="onnx", runtime: str = "onnxruntime") -> None:
    """Fail when a logit differs by more than tolerance x max(1, |largest logit|) or argmax agrees < 99%."""
    for r in rows:
        limit = tolerance * max(1.0, r["max_abs_logit"])
        if r["max_abs_diff"] > limit or r["argmax_agreement"] < MIN_ARGMAX_AGREEMENT:
            raise ExportError(f"{where}: {runtime} disagrees with PyTorch at input {r['shape']}: max |diff| "
                              f"{r['max_abs_diff']:.3g} (limit {limit:.3g}), argmax agreement "
                              f"{r['argmax_agreement']:.4f} (need {MIN_ARGMAX_AGREEMENT})")


def log_parity(rows: list) -> None:
    for r in rows:
        log.info(f"  input {'x'.join(map(str, r['shape']))}: max |logit diff| {r['max_abs_diff']:.2e} "
                 f"(max |logit| {r['max_abs_logit']:.1f}), argmax agreement {100 * r['argmax_agreement']:.3f}%")


def checkpoint_model(ckpt, output_stride: int, data_cfg=None) -> tuple:
    """(eval model at `output_stride`, its metadata, the data config for sample images) from a checkpoint
    file or a loaded Checkpoint."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    model = prepare_model(ckpt.model, output_stride)
    if data_cfg is None and ckpt.experiment is not None:
        data_cfg = ckpt.experiment.data
    class_names, mean, std = dataset_meta(data_cfg, ckpt.config.num_classes)
    source = Path(ckpt.path).name if ckpt.path else None
    digest = file_sha256(ckpt.path) if ckpt.path and Path(ckpt.path).is_file() else None
    meta = build_metadata(model.config, class_names, mean, std, ckpt.state, source=source, data_cfg=data_cfg,
                          source_sha256=digest)
    return model, meta, data_cfg


def export_checkpoint(ckpt, out_path, output_stride: int = 8, dynamic: bool = True, opset: Optional[int] = None,
                      parity_sizes: Sequence[int] = (97, 65), parity_batch: int = 2, tolerance: float = 1e-3,
                      data_cfg=None) -> tuple:
    """Checkpoint (file or loaded) -> ONNX at `output_stride`; returns (path, metadata, parity rows).
    Atomic: a failed check leaves no file behind."""
    model, meta, data_cfg = checkpoint_model(ckpt, output_stride, data_cfg)
    out_path = Path(out_path)
    ensure_dir(out_path.parent)
    example = torch.randn(2, 3, min(parity_sizes), min(parity_sizes))
    if not dynamic:  # a static model is exported, and checked, at the one shape it will see
        example = torch.randn(parity_batch, 3, parity_sizes[0], parity_sizes[0])
        parity_sizes = parity_sizes[:1]
    log.info(f"exporting {model.config.backbone} at output stride {output_stride} "
             f"({'dynamic batch/height/width' if dynamic else 'static ' + 'x'.join(map(str, example.shape))})...")
    t0 = time.time()
    with atomic_path(out_path) as tmp:
        export_model(model, tmp, meta, example, dynamic, opset)
        log.info(f"exported in {time.time() - t0:.1f}s; onnx.checker passed; checking parity in onnxruntime...")
        rows = parity(model, tmp, parity_inputs(parity_sizes, parity_batch, data_cfg))
        log_parity(rows)
        check_parity(rows, tolerance, str(out_path))
    meta["parity"] = rows
    return out_path, meta, rows


ALIASES = [Alias("--output-stride", "export.output_stride", "inference output stride"),
           SwitchOff("--static", "export.dynamic",
                     "set it false: fixed batch and size, --parity-size x --parity-batch"),
           Alias("--dynamic", "export.dynamic", "dynamic batch, height, width", switch=True),
           Alias("--opset", "export.opset", "ONNX opset (null: the exporter's)"),
           Alias("--tolerance", "export.tolerance", "max |logit diff| allowed, relative to max(1, |largest logit|)")]


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.to_onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a DeepLabv3 checkpoint (e.g. best.ckpt)")
    p.add_argument("-o", "--output", help="ONNX file to write (default: CHECKPOINT with .onnx)")
    p.add_argument("--parity-size", type=int, nargs="+", default=[97, 65], metavar="PX",
                   help="image sides for the parity check (default 97 65; a static export: the first one)")
    p.add_argument("--parity-batch", type=int, default=2, help="images per parity batch (default 2)")
    add_config_args(p, aliases=ALIASES)
    args = p.parse_args(argv)
    show_progress()
    ckpt = load_checkpoint(args.checkpoint)
    cfg = config_from_args(args, base=ckpt.experiment)
    ex = cfg.export
    ex.opset = check_opset(ex.opset, "onnxruntime")  # the parity check loads it in onnxruntime
    out = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(".onnx")
    say_unwritten_on_stop(out)
    _, meta, _ = export_checkpoint(ckpt, out, ex.output_stride, ex.dynamic, ex.opset, args.parity_size,
                                   args.parity_batch, ex.tolerance, cfg.data)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, output stride {meta['output_stride']}, "
          f"{meta['num_classes']} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
