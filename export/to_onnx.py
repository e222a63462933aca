"""Checkpoint -> one self-contained ONNX file at the inference output stride, checked against PyTorch.

    python -m export.to_onnx best.ckpt -o model.onnx --output-stride 8

The model is rebuilt from the checkpoint alone, synchronized BatchNorm becomes plain BatchNorm in eval mode
(folded into the convs by the exporter), and batch, height and width are dynamic unless ``--static``.
The ONNX's metadata_props carry what a runtime needs to use it without the checkpoint: classes, class names,
output stride, rates, Multi-Grid and the normalization mean/std (JSON values, `read_metadata`). The file is
written under a temporary name, checked (onnx.checker, then onnxruntime against PyTorch: max absolute logit
difference and argmax agreement) and only then renamed into place.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .runtime import progress

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
META_PREFIX = "deeplab."
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_ARGMAX_AGREEMENT = 0.99  # ties between near-equal logits may flip a few pixels; more is a real mismatch


class ExportError(RuntimeError):
    """Export produced a wrong or invalid model; one line saying what and by how much."""


# ------------------------------------------------------------------------------------------ preparing
def to_plain_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every synchronized / custom BatchNorm (SyncBatchNorm, the cluster's CPU sync BN) by a plain
    BatchNorm2d with the same statistics: the exporter folds only plain BatchNorm in eval mode."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and type(child) is not nn.BatchNorm2d:
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            to_plain_batchnorm(child)
    return model


def prepare_model(model: nn.Module, output_stride: Optional[int] = None) -> nn.Module:
    model = to_plain_batchnorm(model)
    if output_stride and hasattr(model, "set_output_stride"):
        model.set_output_stride(output_stride)
    return model.eval()


# ------------------------------------------------------------------------------------------ metadata
def build_metadata(model_cfg, class_names: Optional[Sequence[str]] = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   state: Optional[dict] = None, source: Optional[str] = None) -> dict:
    """What a runtime needs besides the graph; values are JSON-encodable Python objects."""
    from deeplab.config import to_plain

    names = list(class_names) if class_names else [f"class_{i}" for i in range(model_cfg.num_classes)]
    if len(names) != model_cfg.num_classes:
        names = [f"class_{i}" for i in range(model_cfg.num_classes)]
    meta = {
        "num_classes": model_cfg.num_classes,
        "class_names": names,
        "output_stride": model_cfg.output_stride,
        "aspp_rates": list(model_cfg.rates_at()),
        "multi_grid": list(model_cfg.multi_grid),
        "backbone": model_cfg.backbone,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "input": f"{INPUT_NAME}: float32 N x 3 x H x W, RGB, (pixel/255 - mean) / std",
        "output": f"{OUTPUT_NAME}: float32 N x num_classes x H x W (argmax over classes gives the label map)",
        "model_config": to_plain(model_cfg),
    }
    metrics = (state or {}).get("metrics") or {}
    if isinstance(metrics, dict) and metrics.get("val_miou") is not None:
        meta["val_miou"] = float(metrics["val_miou"])
    elif (state or {}).get("val_miou") is not None:
        meta["val_miou"] = float(state["val_miou"])
    if source:
        meta["source"] = source
    return meta


def set_metadata(onnx_model, meta: dict) -> None:
    import onnx

    keep = [p for p in onnx_model.metadata_props if not p.key.startswith(META_PREFIX)]
    del onnx_model.metadata_props[:]
    onnx_model.metadata_props.extend(keep)
    for key, value in meta.items():
        onnx_model.metadata_props.append(onnx.StringStringEntryProto(key=META_PREFIX + key, value=json.dumps(value)))


def read_metadata(onnx_model_or_path) -> dict:
    """The ``deeplab.*`` metadata of an ONNX model (or file), JSON-decoded."""
    import onnx

    model = onnx_model_or_path
    if not hasattr(model, "metadata_props"):
        model = onnx.load(str(onnx_model_or_path), load_external_data=False)
    out = {}
    for p in model.metadata_props:
        if p.key.startswith(META_PREFIX):
            try:
                out[p.key[len(META_PREFIX):]] = json.loads(p.value)
            except json.JSONDecodeError:
                out[p.key[len(META_PREFIX):]] = p.value
    return out


# ------------------------------------------------------------------------------------------ export
def _dynamo_export(model, example, path, dynamic, opset):
    from torch.export import Dim

    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], external_data=False, dynamo=True,
                  verbose=False)
    if opset:
        kwargs["opset_version"] = opset
    if dynamic:
        kwargs["dynamic_shapes"] = {INPUT_NAME: {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")}}
    import logging
    import warnings

    # the exporter logs one line per torchvision op it cannot register and a FutureWarning from pytree
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(model, (example,), str(path), **kwargs)


def export_model(model: nn.Module, path, meta: dict, example: Optional[torch.Tensor] = None,
                 dynamic: bool = True, opset: Optional[int] = None) -> Path:
    """Export an eval-mode model to `path` (one file, metadata embedded, onnx.checker passed).

    The example batch has 2 images: the exporter specializes size-1 dimensions, so a batch of 1 would
    make the batch dimension static."""
    import onnx

    path = Path(path)
    if example is None:
        example = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        _dynamo_export(model, example, path, dynamic, opset)
    onnx_model = onnx.load(str(path))
    set_metadata(onnx_model, meta)
    onnx.checker.check_model(onnx_model, full_check=True)
    onnx.save(onnx_model, str(path))
    return path


def parity(model: nn.Module, onnx_path, inputs: Sequence[torch.Tensor], providers=None) -> list:
    """PyTorch vs onnxruntime on each input batch: max |logit diff|, max |logit|, argmax agreement."""
    from .runtime import OnnxRunner

    runner = OnnxRunner(onnx_path, providers or ["CPUExecutionProvider"])
    rows = []
    for x in inputs:
        with torch.no_grad():
            ref = model(x).float().numpy()
        out = runner(x)
        if out.shape != ref.shape:
            raise ExportError(f"{onnx_path}: onnxruntime output shape {out.shape} != PyTorch {ref.shape} "
                              f"for input {tuple(x.shape)}")
        rows.append({"shape": list(x.shape), "max_abs_diff": float(np.abs(out - ref).max()),
                     "max_abs_logit": float(np.abs(ref).max()),
                     "argmax_agreement": float((out.argmax(1) == ref.argmax(1)).mean())})
    return rows


def check_parity(rows: list, tolerance: float, where="onnx") -> None:
    """Fail when a logit differs by more than tolerance x max(1, |largest logit|) or argmax agrees < 99%."""
    for r in rows:
        limit = tolerance * max(1.0, r["max_abs_logit"])
        if r["max_abs_diff"] > limit or r["argmax_agreement"] < MIN_ARGMAX_AGREEMENT:
            raise ExportError(f"{where}: onnxruntime disagrees with PyTorch at input {r['shape']}: max |diff| "
                              f"{r['max_abs_diff']:.3g} (limit {limit:.3g}), argmax agreement "
                              f"{r['argmax_agreement']:.4f} (need {MIN_ARGMAX_AGREEMENT})")


def parity_inputs(sizes: Sequence[int], batch: int = 2, data_cfg=None, seed: int = 0) -> list:
    """One batch per size: real images from the dataset when it loads, else seeded noise."""
    from .precision import sample_images

    inputs = []
    for size in sizes:
        x = sample_images(data_cfg, "val", batch, size) if data_cfg is not None else None
        if x is None:
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + size))
        inputs.append(torch.as_tensor(x))
    return inputs


def export_checkpoint(ckpt_path, out_path, output_stride: int = 8, dynamic: bool = True, opset: Optional[int] = None,
                      parity_sizes: Sequence[int] = (97, 65), parity_batch: int = 2, tolerance: float = 1e-3,
                      data_cfg=None, log=progress) -> tuple:
    """Checkpoint -> ONNX at `output_stride`; returns (path, metadata, parity rows). Atomic: a failed
    check leaves no file behind."""
    from deeplab.checkpoint import load_checkpoint
    from .precision import dataset_meta

    ckpt = load_checkpoint(ckpt_path)
    model = prepare_model(ckpt.model, output_stride)
    if data_cfg is None and ckpt.experiment is not None:
        data_cfg = ckpt.experiment.data
    class_names, mean, std = dataset_meta(data_cfg, ckpt.config.num_classes)
    meta = build_metadata(model.config, class_names, mean, std, ckpt.state, source=Path(ckpt_path).name)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}.onnx")
    try:
        t0 = time.time()
        example = torch.randn(2, 3, min(parity_sizes), min(parity_sizes))
        if not dynamic:  # a static model is exported, and checked, at the one shape it will see
            example = torch.randn(parity_batch, 3, parity_sizes[0], parity_sizes[0])
            parity_sizes = parity_sizes[:1]
        log(f"exporting {ckpt.config.backbone} at output stride {output_stride} "
            f"({'dynamic batch/height/width' if dynamic else 'static ' + 'x'.join(map(str, example.shape))})...")
        export_model(model, tmp, meta, example, dynamic, opset)
        log(f"exported in {time.time() - t0:.1f}s; onnx.checker passed; checking parity in onnxruntime...")
        rows = parity(model, tmp, parity_inputs(parity_sizes, parity_batch, data_cfg))
        for r in rows:
            log(f"  input {'x'.join(map(str, r['shape']))}: max |logit diff| {r['max_abs_diff']:.2e} "
                f"(max |logit| {r['max_abs_logit']:.1f}), argmax agreement {100 * r['argmax_agreement']:.3f}%")
        check_parity(rows, tolerance, str(out_path))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    meta["parity"] = rows
    return out_path, meta, rows


def main(argv=None) -> int:
    from deeplab.config import ConfigError, add_config_args, load_config

    p = argparse.ArgumentParser(prog="python -m export.to_onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a DeepLabv3 checkpoint (e.g. best.ckpt)")
    p.add_argument("-o", "--output", help="ONNX file to write (default: CHECKPOINT with .onnx)")
    p.add_argument("--output-stride", type=int, default=None, help="inference output stride (default: export.output_stride, 8)")
    p.add_argument("--static", action="store_true", help="fixed batch and size (--parity-size, --parity-batch)")
    p.add_argument("--dynamic", dest="static", action="store_false", help="dynamic batch, height, width (default)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--parity-size", type=int, action="append", default=None,
                   help="image side for the parity check (repeatable; default 97 and 65; static export: the size)")
    p.add_argument("--parity-batch", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |logit diff| allowed, relative to max(1, |largest logit|) (default export.tolerance)")
    add_config_args(p)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides) if (args.config or args.overrides) else None
        ex = cfg.export if cfg else None
        from deeplab.config import ExportConfig

        ex = ex or ExportConfig()
        out = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(".onnx")
        _, meta, rows = export_checkpoint(
            args.checkpoint, out, args.output_stride or ex.output_stride, dynamic=not args.static and ex.dynamic,
            opset=args.opset or ex.opset, parity_sizes=args.parity_size or (97, 65), parity_batch=args.parity_batch,
            tolerance=args.tolerance if args.tolerance is not None else ex.tolerance,
            data_cfg=cfg.data if cfg else None)
    except (ValueError, ConfigError, ExportError, FileNotFoundError) as e:
        print(f"to_onnx: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, output stride {meta['output_stride']}, "
          f"{meta['num_classes']} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
