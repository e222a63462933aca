"""python -m export.evaluate MODEL [--data DIR] [--format F] [--split S] [--multi-scale | --scales S ...] [--flip]

Per-class IoU table and mIoU of an exported model (an ONNX file, an OpenVINO .xml IR or a TensorRT engine) on a
dataset split: the same table, JSON and evaluator as ``deeplab.evaluate`` gives for a checkpoint, so an exported
model is judged the way its checkpoint was. Classes, output stride and the dataset it was trained for come from
the file's own metadata; --data, --config or --set choose another dataset.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from deeplab.cli import UserError, command
from deeplab.config import Alias, ConfigError, add_config_args, experiment_from_dict
from deeplab.evaluate import (DATA_ALIASES, add_inference_args, eval_loader, inference_options, resolve_experiment,
                              result_path, run_evaluation)
from deeplab.inference import predict_logits

from .cli import show_progress
from .metadata import read_ir_metadata, read_metadata
from .runtime import OnnxRunner, OpenVINORunner, TensorRTRunner, read_sidecar

ENGINE_HINT = "a TensorRT engine (with its ENGINE.json sidecar)"


def open_exported(path) -> tuple:
    """(runner: images -> logits, deeplab.* metadata, backend) of an .onnx, OpenVINO .xml or TensorRT engine."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        runner = OnnxRunner(path)
        meta, backend = read_metadata(path), f"onnxruntime ({runner.providers[0]})"
    elif suffix == ".xml":
        runner = OpenVINORunner(path)
        meta, backend = read_ir_metadata(runner.model), "openvino (CPU)"
    elif suffix in (".ckpt", ".pt", ".pth"):
        raise UserError(f"{path}: a checkpoint; evaluate it with python -m deeplab.evaluate")
    else:
        runner = TensorRTRunner(path)
        meta, backend = read_sidecar(path).get("metadata") or {}, "tensorrt"
    if "num_classes" not in meta:
        raise UserError(f"{path}: no deeplab.* metadata (classes, output stride); export it with python -m "
                        "export.to_onnx, export.to_openvino or export.to_tensorrt")
    return runner, meta, backend


def exported_predictor(runner, opts: dict):
    """``predict(images) -> logits`` with the checkpoint path's scales, flips and windows around the runner."""
    def model(images):
        out = runner(images)
        return torch.from_numpy(out) if isinstance(out, np.ndarray) else out.float().cpu()

    def predict(images):
        return predict_logits(model, images, None, opts["scales"], opts["flip"], opts["window"])

    return predict


def exported_options(args, meta: dict, path) -> dict:
    """inference_options, with the output stride the file was exported at (it cannot change)."""
    opts = inference_options(args)
    stride = meta.get("output_stride")
    if opts["output_stride"] and opts["output_stride"] != stride:
        raise ConfigError(f"--output-stride {opts['output_stride']}: {path} was exported at output stride {stride}; "
                          "evaluate the checkpoint with deeplab.evaluate or export it again at that stride")
    return {**opts, "output_stride": stride}


def model_experiment(meta: dict):
    """The experiment the file remembers (its training data section), or None for the defaults."""
    return experiment_from_dict({"data": meta["data_config"]}, "model metadata") if meta.get("data_config") else None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.evaluate", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help=f"an exported model: .onnx, OpenVINO .xml, or {ENGINE_HINT}")
    parser.add_argument("--data", help="dataset folder, or 'synthetic' (default: the model's own data section)")
    add_inference_args(parser)
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument("-o", "--output", help="JSON results (default: MODEL.eval-SPLIT.json)")
    add_config_args(parser, aliases=DATA_ALIASES + [Alias("--split", "data.val_split", "split to evaluate"),
                                                    Alias("--workers", "data.loader_workers", "DataLoader workers")])
    args = parser.parse_args(argv)
    args.batch_size = 1  # exported models may have a fixed batch; images of a split differ in size anyway
    return args


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    show_progress()
    runner, meta, backend = open_exported(args.model)
    opts = exported_options(args, meta, args.model)
    exp = resolve_experiment(model_experiment(meta), args)
    loader, info = eval_loader(exp, int(meta["num_classes"]), args.model, args)
    out = result_path(args.output, f"{args.model}.eval-{exp.data.val_split}.json")
    run_evaluation(exported_predictor(runner, opts), loader, info, exp, opts, out,
                   {"model": str(args.model), "backend": backend, "precision": meta.get("precision", "fp32")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
