"""python -m deeplab.data check --format voc --root DIR [--split train]

Validates a dataset before a long run: missing partners, unreadable or truncated images, decompression
bombs, mask size != image size, label values outside the classes and 255, RGB masks where indexed ones are
expected, empty splits. One line per problem naming the file, then a summary with the class-pixel
histogram; exit status 1 when anything is wrong.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..cli import command
from ..config import Alias, add_config_args, config_from_args
from ..progress import Progress
from .datasets import dataset_info, find_pairs, label_map
from .io import DatasetError, load_pair


def _check_one(pair, labels):
    try:
        _, mask = load_pair(pair[0], pair[1], labels)
    except DatasetError as e:
        return None, str(e)
    counts = np.bincount(mask.ravel(), minlength=256)
    return counts, None


def check(cfg, split: str, workers: int = 4, out=None, err=None) -> int:
    """Check one split of ``cfg`` (a DataConfig); print problems and a summary; return the problem count."""
    out, err = out or sys.stdout, err or sys.stderr
    info = dataset_info(cfg)
    labels = label_map(cfg, info)
    pairs, problems = find_pairs(cfg, split)
    for line in problems:
        print(line, file=out)
    if not pairs:
        problems.append("empty")
        print(f"{cfg.root}: split {split!r} of the {cfg.dataset} dataset has no image/mask pairs", file=out)
    totals = np.zeros(256, np.int64)
    images_with = np.zeros(256, np.int64)
    bar = Progress(len(pairs), "check", interval=2, stream=err)
    with ThreadPoolExecutor(max(1, workers)) as pool:  # Pillow decodes without the GIL
        for counts, problem in pool.map(lambda p: _check_one(p, labels), pairs):
            if problem:
                problems.append(problem)
                print(problem, file=out, flush=True)
            else:
                totals += counts
                images_with += counts > 0
            bar.update()
    pixels = totals.sum()
    print(f"\n{cfg.dataset} {split}: {len(pairs)} image/mask pairs, {len(problems)} problem(s)", file=out)
    if pixels:
        print(f"{'id':>4}  {'class':<22}{'pixels':>14}{'share':>9}{'images':>9}", file=out)
        ids = list(range(info.num_classes)) + [cfg.ignore_index]
        for k in ids:
            name = info.class_names[k] if k < info.num_classes else "(ignore)"
            print(f"{k:>4}  {name[:21]:<22}{totals[k]:>14,}{100 * totals[k] / pixels:>8.2f}%{images_with[k]:>9}",
                  file=out)
        absent = [info.class_names[k] for k in range(info.num_classes) if totals[k] == 0]
        if absent:
            print(f"note: {len(absent)} class(es) never appear: {', '.join(absent[:10])}"
                  f"{' ...' if len(absent) > 10 else ''}", file=out)
    return len(problems)


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deeplab.data", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate a dataset split before a long run")
    p.add_argument("--workers", type=int, default=4, help="decoding threads (default 4)")
    add_config_args(p, aliases=[
        Alias("--format", "data.dataset", "dataset layout", choices=("voc", "cityscapes", "ade20k", "folder"),
              default_note="required unless --config names one; the config default, synthetic, has no files"),
        Alias("--root", "data.root", "dataset folder"),
        Alias("--split", "data.train_split", "split to check"),
        Alias("--num-classes", "data.num_classes", "classes of a folder dataset without classes.txt")])
    args = parser.parse_args(argv)
    cfg = config_from_args(args).data
    if cfg.dataset == "synthetic":
        parser.error("check needs --format voc|cityscapes|ade20k|folder (synthetic data has no files)")
    return 1 if check(cfg, cfg.train_split, args.workers) else 0


if __name__ == "__main__":
    sys.exit(main())
