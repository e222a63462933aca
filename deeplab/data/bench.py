"""python -m deeplab.data.bench [--images 48] [--rounds 3] [--crop 513]

Images/s per core of the input pipeline: decode + the paper's augmentation (random scale 0.5-2.0, pad,
random 513 crop, flip, normalize) on VOC-sized (500x375) JPEGs with palette-PNG masks that it writes to a
temporary VOC tree, one process, one thread, measured in CPU time. Also times synthetic scene generation at the
demo's sizes. A GPU consuming N images/s needs about N / (this figure) loader cores.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from ..cli import command
from ..config import Alias, DataConfig, add_config_args, config_from_args
from ..palette import palette_bytes, voc_palette
from .datasets import build_dataset
from .io import read_image, read_mask
from .synthetic import render


def write_voc_tree(root: Path, n: int, seed: int = 0) -> list:
    """n 500x375 JPEG photos (synthetic scenes, so they compress like pictures, not noise) + palette masks."""
    voc = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n):
        image, mask = render(seed, i, 500, 12)
        image, mask = image[62:437], mask[62:437]  # 500 wide x 375 high, like most VOC photos
        ident = f"2012_{i:06d}"
        Image.fromarray(image).save(voc / "JPEGImages" / f"{ident}.jpg", quality=90)
        m = Image.fromarray(mask, mode="P")
        m.putpalette(palette_bytes(voc_palette(256)))
        m.save(voc / "SegmentationClass" / f"{ident}.png")
        ids.append(ident)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    return ids


def _rate(fn, n: int, rounds: int) -> float:
    """Median images per CPU-second over ``rounds`` passes of n calls: process CPU time, one thread, so the
    figure is per core and holds on a busy machine where wall time would not."""
    rates = []
    for _ in range(rounds):
        start = time.process_time()
        for i in range(n):
            fn(i)
        rates.append(n / (time.process_time() - start))
    return statistics.median(rates)


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deeplab.data.bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("--images", type=int, default=48, help="JPEGs to write and cycle through (default 48)")
    parser.add_argument("--rounds", type=int, default=3, help="passes; the median is printed (default 3)")
    parser.add_argument("--synthetic-sizes", type=int, nargs="*", default=[129, 257, 513],
                        help="synthetic scene sizes to time (default 129 257 513)")
    add_config_args(parser, aliases=[Alias("--crop", "data.crop_size", "training crop")])
    args = parser.parse_args(argv)
    crop = config_from_args(args).data.crop_size
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing {args.images} VOC-sized (500x375) JPEGs + palette PNGs to {tmp} ...", flush=True)
        write_voc_tree(Path(tmp), args.images)
        cfg = DataConfig(dataset="voc", root=tmp, crop_size=crop)
        train = build_dataset(cfg, "train", train=True)
        pairs = train.pairs
        decode = _rate(lambda i: (read_image(pairs[i][0]), read_mask(pairs[i][1])), len(pairs), args.rounds)
        full = _rate(lambda i: train[i], len(train), args.rounds)
        val = build_dataset(DataConfig(dataset="voc", root=tmp, val_split="train"), "train", train=False)
        whole = _rate(lambda i: val[i], len(val), args.rounds)
    print(f"decode only (JPEG + PNG)                   {decode:7.1f} images/s per core")
    print(f"decode + augment to {crop}x{crop} crops          {full:7.1f} images/s per core"
          f"  ({1000 / full:.1f} ms/image)")
    print(f"decode + normalize whole image (eval)      {whole:7.1f} images/s per core")
    for size in args.synthetic_sizes:
        n = max(8, int(2000 / size))
        gen = _rate(lambda i, size=size: render(0, i, size, 6), n, args.rounds)
        dcfg = DataConfig(synthetic_size=size, crop_size=size, synthetic_train=n)
        ds = build_dataset(dcfg, "train", train=True)
        aug = _rate(lambda i, ds=ds: ds[i], n, args.rounds)
        print(f"synthetic {size}x{size}: generate {gen:7.1f} images/s per core ({1000 / gen:.1f} ms), "
              f"generate + augment {aug:7.1f} images/s per core ({1000 / aug:.1f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
