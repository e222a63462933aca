"""python -m deeplab.evaluate CKPT [--data DIR] [--output-stride 8] [--multi-scale | --scales S ...] [--flip]

Per-class IoU table and mIoU of a checkpoint on a dataset split, written as JSON too. The dataset is the
checkpoint's own data section unless --data (a dataset folder, layout guessed or given by --format),
--config or --set say otherwise. The paper's best setting is ``--output-stride 8 --multi-scale --flip``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .cli import OutputError, command, on_interrupt
from .config import INFERENCE_ALIASES, Alias, ConfigError, add_config_args, config_from_args
from .data import build_dataset, dataset_for_model, detect_format
from .data.formats import DATASETS
from .fileio import ensure_dir, write_text_atomic
from .inference import evaluate, model_predictor
from .progress import Progress

DATA_ALIASES = [Alias("--format", "data.dataset", "layout of --data (default: guessed from the folder)",
                      choices=DATASETS)]


def resolve_experiment(base, args):
    """The ExperimentConfig to use: --config if given, else ``base`` (a checkpoint's own experiment, or None for
    the defaults), then --set and the shorthand flags; --data DIR sets data.root (and data.dataset, guessed from
    the layout unless --format)."""
    extra = []
    data = getattr(args, "data", None)
    if data == "synthetic":
        extra.append(("data.dataset=synthetic", "--data synthetic"))
    elif data:
        extra.append((f"data.root={data}", f"--data {data}"))
        if not getattr(args, "format", None):
            extra.append((f"data.dataset={detect_format(data)}", f"--data {data}"))
    return config_from_args(args, base=base, extra=tuple(extra))


def format_table(result: dict) -> str:
    lines = [f"{'class':<24}{'IoU %':>8}"]
    for name, v in result["iou"].items():
        lines.append(f"{name[:23]:<24}{'-' if v is None else f'{100 * v:.2f}':>8}")
    lines.append(f"{'mIoU':<24}{100 * result['miou']:>8.2f}")
    lines.append(f"{'pixel accuracy':<24}{100 * result['pixel_accuracy']:>8.2f}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deeplab.evaluate", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a DeepLabv3 checkpoint (.ckpt)")
    parser.add_argument("--data", help="dataset folder, or 'synthetic' (default: the checkpoint's data section)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images per batch (default: 1; >1 needs data.val_size)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images (default: all)")
    parser.add_argument("-o", "--output", help="JSON results (default: CHECKPOINT.eval-SPLIT.json)")
    add_config_args(parser, aliases=DATA_ALIASES + INFERENCE_ALIASES + [
        Alias("--split", "data.val_split", "split to evaluate"),
        Alias("--workers", "data.loader_workers", "DataLoader workers")])
    return parser.parse_args(argv)


def eval_loader(exp, num_classes: int, model_path, args):
    """The evaluation DataLoader for the experiment's val split, checked against the model's classes."""
    data = exp.data
    info = dataset_for_model(data, num_classes, str(model_path), "; point --data at its dataset")
    if args.batch_size > 1 and not data.val_size:
        raise ConfigError(f"--batch-size {args.batch_size} needs equal-sized images: "
                          "--set data.val_size=513 (or the largest image side)")
    dataset = build_dataset(data, data.val_split, train=False)
    if args.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=data.loader_workers)
    return loader, info


def result_path(output, default) -> Path:
    """The JSON file to write, checked now (not after the evaluation)."""
    out = Path(output) if output else Path(default)
    if out.is_dir():
        raise OutputError(out, "it is a folder; expected a file name")
    ensure_dir(out.parent)
    return out


def run_evaluation(predict, loader, info, exp, opts: dict, out: Path, model: dict) -> dict:
    """Evaluate `predict` over `loader` with progress, print the per-class table, write the JSON result.
    `model`: what was evaluated ({"checkpoint": path} or an exported file's fields); `opts["output_stride"]`
    is the stride it ran at."""
    data, images = exp.data, len(loader.dataset)
    name = next(iter(model.values()))
    on_interrupt(f"no results written ({out} is as it was); the same command evaluates again from the first image")
    print(f"evaluating {name} on {data.dataset} {data.val_split} ({images} images) at output stride "
          f"{opts['output_stride']}, scales {list(opts['scales'])}, flip {opts['flip']}", file=sys.stderr)
    start = time.monotonic()
    cm = evaluate(predict, loader, info.num_classes, data.ignore_index, progress=Progress(images, "eval").update)
    result = cm.to_dict(info.class_names)
    result.update(model)
    result.update({"dataset": data.dataset, "root": data.root, "split": data.val_split, "images": images,
                   "output_stride": opts["output_stride"], "scales": list(opts["scales"]), "flip": opts["flip"],
                   "window": opts["window"], "seconds": round(time.monotonic() - start, 2)})
    print(format_table(result))
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return result


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    exp = resolve_experiment(ckpt.experiment, args)
    opts = exp.inference.options()
    loader, info = eval_loader(exp, ckpt.config.num_classes, args.checkpoint, args)
    out = result_path(args.output, f"{args.checkpoint}.eval-{exp.data.val_split}.json")
    predict = model_predictor(ckpt.model, **opts)
    opts["output_stride"] = opts["output_stride"] or ckpt.config.output_stride
    run_evaluation(predict, loader, info, exp, opts, out, {"checkpoint": str(args.checkpoint)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
