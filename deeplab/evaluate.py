"""python -m deeplab.evaluate CKPT [--data DIR] [--output-stride 8] [--multi-scale | --scales S ...] [--flip]

Per-class IoU table and mIoU of a checkpoint on a dataset split, written as JSON too. The dataset is the
checkpoint's own data section unless --data (a dataset folder, layout guessed or given by --format),
--config or --set say otherwise. The paper's best setting is ``--output-stride 8 --multi-scale --flip``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .config import ConfigError, add_config_args, apply_overrides, experiment_from_dict, load_config, to_plain
from .inference import PAPER_SCALES, evaluate


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-stride", type=int, choices=[8, 16, 32],
                        help="run at this output stride (default: the checkpoint's; the paper evaluates at 8)")
    parser.add_argument("--scales", type=float, nargs="+", metavar="S",
                        help="input scales whose softmax probabilities are averaged (default: 1.0)")
    parser.add_argument("--multi-scale", action="store_true",
                        help=f"the paper's scales {', '.join(map(str, PAPER_SCALES))}")
    parser.add_argument("--flip", action="store_true", help="also average left-right flipped inputs")
    parser.add_argument("--window", type=int, metavar="PX",
                        help="sliding windows of PX x PX (1/3 overlap) for inputs larger than that")


def inference_options(args) -> dict:
    scales = PAPER_SCALES if args.multi_scale else tuple(args.scales or (1.0,))
    if any(s <= 0 for s in scales):
        raise ConfigError(f"--scales {' '.join(map(str, scales))}: scales must be > 0")
    if args.window is not None and args.window < 16:
        raise ConfigError(f"--window {args.window}: use at least 16 pixels")
    return {"output_stride": args.output_stride, "scales": scales, "flip": args.flip, "window": args.window}


def resolve_experiment(ckpt, args):
    """The ExperimentConfig to use: --config if given, else the checkpoint's (or defaults), with --set,
    then --data/--format on top."""
    from .data import detect_format

    if args.config:
        exp = load_config(args.config, args.overrides)
    else:
        base = to_plain(ckpt.experiment) if ckpt.experiment is not None else {}
        exp = experiment_from_dict(apply_overrides(base, args.overrides), "checkpoint config")
    data = exp.data
    if getattr(args, "data", None):
        if args.data == "synthetic":
            data.dataset = "synthetic"
        else:
            data.root = args.data
            data.dataset = args.format or detect_format(args.data)
    elif getattr(args, "format", None):
        data.dataset = args.format
    return exp


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def format_table(result: dict) -> str:
    lines = [f"{'class':<24}{'IoU %':>8}"]
    for name, v in result["iou"].items():
        lines.append(f"{name[:23]:<24}{'-' if v is None else f'{100 * v:.2f}':>8}")
    lines.append(f"{'mIoU':<24}{100 * result['miou']:>8.2f}")
    lines.append(f"{'pixel accuracy':<24}{100 * result['pixel_accuracy']:>8.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deeplab.evaluate", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a DeepLabv3 checkpoint (.ckpt)")
    parser.add_argument("--data", help="dataset folder, or 'synthetic' (default: the checkpoint's data section)")
    parser.add_argument("--format", choices=["voc", "cityscapes", "ade20k", "folder", "synthetic"],
                        help="layout of --data (default: guessed)")
    parser.add_argument("--split", help="split to evaluate (default: data.val_split)")
    add_inference_args(parser)
    parser.add_argument("--batch-size", type=int, default=1, help="images per batch (>1 needs data.val_size)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: data.loader_workers)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument("-o", "--output", help="JSON results (default: CHECKPOINT.eval-SPLIT.json)")
    add_config_args(parser)
    args = parser.parse_args(argv)

    from .checkpoint import CheckpointError, load_checkpoint
    from .data import DatasetError, build_dataset, dataset_info

    try:
        opts = inference_options(args)
        ckpt = load_checkpoint(args.checkpoint)
        exp = resolve_experiment(ckpt, args)
        data = exp.data
        split = args.split or data.val_split
        info = dataset_info(data)
        if info.num_classes != ckpt.config.num_classes:
            raise ConfigError(f"{args.checkpoint}: the model predicts {ckpt.config.num_classes} classes but the "
                              f"{data.dataset} dataset has {info.num_classes}; point --data at its dataset")
        if args.batch_size > 1 and not data.val_size:
            raise ConfigError(f"--batch-size {args.batch_size} needs equal-sized images: "
                              "--set data.val_size=513 (or the largest image side)")
        dataset = build_dataset(data, split, train=False)
        if args.limit:
            dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
        workers = data.loader_workers if args.workers is None else args.workers
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=workers)
        out = Path(args.output) if args.output else Path(f"{args.checkpoint}.eval-{split}.json")
        os_ = opts["output_stride"] or ckpt.config.output_stride
        print(f"evaluating {args.checkpoint} on {data.dataset} {split} ({len(dataset)} images) at output stride "
              f"{os_}, scales {list(opts['scales'])}, flip {opts['flip']}", file=sys.stderr)
        start = time.monotonic()
        cm = evaluate(ckpt.model, loader, info.num_classes, ignore_index=data.ignore_index, progress=True, **opts)
    except (CheckpointError, DatasetError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = cm.to_dict(info.class_names)
    result.update({"checkpoint": str(args.checkpoint), "dataset": data.dataset, "root": data.root, "split": split,
                   "images": len(dataset), "output_stride": os_, "scales": list(opts["scales"]),
                   "flip": opts["flip"], "window": opts["window"], "seconds": round(time.monotonic() - start, 2)})
    print(format_table(result))
    _atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
