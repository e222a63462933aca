"""python -m export.evaluate MODEL [--data DIR] [--format F] [--split S] [--multi-scale | --scales S ...] [--flip]

Per-class IoU table and mIoU of an exported model (an ONNX file, an OpenVINO IR or a TensorRT engine) on a
dataset split: the same table, JSON and evaluator as ``deeplab.evaluate`` gives for a checkpoint, so an exported
model is judged the way its checkpoint was. Classes, output stride, align_corners (how multi-scale inference
resizes) and the dataset it was trained for come from the file's own metadata; --data, --config or --set
choose another dataset.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from deeplab.cli import UserError, command
from deeplab.config import INFERENCE_ALIASES, Alias, add_config_args, experiment_from_dict
from deeplab.evaluate import DATA_ALIASES, eval_loader, resolve_experiment, result_path, run_evaluation
from deeplab.inference import predict_logits

from .cli import show_progress
from .model_file import format_of, formats_help, load_runner, read_model_info

MODEL_HELP = f"an exported model: {formats_help(exported_only=True)}"


def _refuse_checkpoint(path) -> None:
    if Path(path).is_file() and not format_of(path).exported:
        raise UserError(f"{path}: a checkpoint; use python -m deeplab.evaluate / deeplab.predict for it")


def open_exported(path, output_stride=None):
    """The exported model opened the one way every command opens model files (export.model_file.load_runner);
    an --output-stride other than the exported one is refused there in one line."""
    _refuse_checkpoint(path)
    return load_runner(path, output_stride=output_stride)


class ExportedModel:
    """The runner as deeplab.inference sees a model: called on a batch, and resizing for multi-scale inference
    with the align_corners its checkpoint used (``config.align_corners``, from the file's metadata)."""

    def __init__(self, runner):
        self.runner, self.config = runner, SimpleNamespace(align_corners=runner.info.align_corners)

    def __call__(self, images):
        return torch.from_numpy(self.runner(images))


def exported_predictor(runner, opts: dict):
    """``predict(images) -> logits`` with the checkpoint path's scales, flips and windows around the runner."""
    model = ExportedModel(runner)

    def predict(images):
        return predict_logits(model, images, None, opts["scales"], opts["flip"], opts["window"])

    return predict


# deeplab's inference flags as an exported model takes them: its graph is fixed at one output stride
EXPORTED_INFERENCE_ALIASES = [
    Alias("--output-stride", "inference.output_stride", "the stride the model was exported at, the only one it "
          "runs at; another is refused (default: the model's own; another stride needs the checkpoint)")
    if alias.flag == "--output-stride" else alias for alias in INFERENCE_ALIASES]


def exported_options(args) -> tuple:
    """(runner, experiment, inference options at the stride the file was exported at: it cannot change). The
    experiment starts from the file's own metadata, so its inference section is read before the model opens."""
    _refuse_checkpoint(args.model)
    exp = resolve_experiment(model_experiment(read_model_info(args.model)), args)
    opts = exp.inference.options()
    runner = open_exported(args.model, opts["output_stride"])
    return runner, exp, {**opts, "output_stride": runner.info.output_stride}


def model_experiment(info):
    """The experiment the file remembers (its training data section), or None for the defaults."""
    return experiment_from_dict({"data": info.data_config}, "model metadata") if info.data_config else None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.evaluate", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--data", help="dataset folder, or 'synthetic' (default: the model's own data section)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images (default: all)")
    parser.add_argument("-o", "--output", help="JSON results (default: MODEL.eval-SPLIT.json)")
    add_config_args(parser, aliases=DATA_ALIASES + EXPORTED_INFERENCE_ALIASES + [
        Alias("--split", "data.val_split", "split to evaluate"),
        Alias("--workers", "data.loader_workers", "DataLoader workers")])
    args = parser.parse_args(argv)
    args.batch_size = 1  # exported models may have a fixed batch; images of a split differ in size anyway
    return args


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    show_progress()
    runner, exp, opts = exported_options(args)
    info = runner.info
    loader, data_info = eval_loader(exp, info.num_classes, args.model, args)
    out = result_path(args.output, f"{args.model}.eval-{exp.data.val_split}.json")
    run_evaluation(exported_predictor(runner, opts), loader, data_info, exp, opts, out,
                   {"model": str(args.model), "backend": info.backend, "precision": info.precision})
    return 0

if __name__ == "__main__":
    sys.exit(main())
