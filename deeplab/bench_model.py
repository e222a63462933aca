"""Forward time of the model at output strides 16 and 8 (same weights), interleaved, median of repeats.

    python -m deeplab.bench_model --backbone resnet101 --size 513 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from .cli import command
from .config import Alias, ConfigError, add_config_args, config_from_args
from .model import build_model


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m deeplab.bench_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1, help="images per forward (default: 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is printed (default: 3)")
    p.add_argument("--strides", type=int, nargs="+", default=[16, 8], help="output strides compared (default: 16 8)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--size", type=int, default=513, help="square input side (default: 513)")
    add_config_args(p, aliases=[Alias("--backbone", "model.backbone", "a registered backbone (deeplab.backbones)")])
    args = p.parse_args(argv)
    if args.size < 1:
        raise ConfigError(f"--size {args.size}: must be >= 1 (the square input side in pixels)")
    cfg = config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(cfg.model).eval()
    size = args.size
    x = torch.randn(args.batch, 3, size, size)
    times = {s: [] for s in args.strides}
    with torch.inference_mode():
        for s in args.strides:  # warm-up each stride once
            model.set_output_stride(s)(x)
        for r in range(args.repeats):
            for s in args.strides:  # interleaved: machine noise hits every stride alike
                model.set_output_stride(s)
                t = time.perf_counter()
                model(x)
                times[s].append(time.perf_counter() - t)
            print(f"round {r + 1}/{args.repeats}: " + "  ".join(f"OS{s} {times[s][-1]:.2f}s" for s in args.strides),
                  flush=True)
    base = args.strides[0]
    for s in args.strides:
        ratio = statistics.median(b / a for a, b in zip(times[base], times[s]))
        print(f"{cfg.model.backbone} OS{s} {size}x{size} batch {args.batch} fp32 ({torch.get_num_threads()} threads): "
              f"median {statistics.median(times[s]):.2f}s, min {min(times[s]):.2f}s, "
              f"median ratio to OS{base} {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
