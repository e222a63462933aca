"""What Ray Train costs: the same model, batch and loop in a plain process and under Ray Train (1 worker).

    python -m cluster.bench [--config configs/demo.yaml] [--iterations 8] [--rounds 3] [--set ...]

Runs alternate plain, Ray, plain, Ray, ... (machines here are shared, so timings drift; interleaving and the
median ratio cancel most of it). Throughput is `deeplab.engine`'s images/s over the training steps
(evaluation excluded) in both; wall time adds, for Ray, starting the worker and reporting checkpoints.
Both use the same number of intra-op threads (Ray gives a worker OMP_NUM_THREADS = its CPUs).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def _config(args):
    from deeplab.config import load_config

    cfg = load_config(args.config, args.overrides)
    cfg.train.batch_size = args.batch
    cfg.train.max_iterations = args.iterations
    cfg.train.eval_interval = args.iterations  # evaluate once, at the end (excluded from images/s)
    cfg.train.log_interval = args.iterations
    cfg.data.synthetic_val = min(cfg.data.synthetic_val, 2)
    cfg.cluster.num_workers = 1
    cfg.cluster.cpus_per_worker = args.threads
    cfg.cluster.max_failures = 0
    return cfg


def run_plain(cfg) -> tuple:
    from deeplab.engine import train

    start = time.perf_counter()
    metrics = train(cfg)
    return metrics["images_per_s"], time.perf_counter() - start


def run_ray(cfg, storage: str, name: str) -> tuple:
    from cluster.train import build_trainer

    start = time.perf_counter()
    result = build_trainer(cfg, name=name, storage_path=storage).fit()
    return result.metrics["images_per_s"], time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench", description=__doc__.split("\n\n")[0])
    from deeplab.config import ConfigError, add_config_args

    add_config_args(parser)
    parser.add_argument("--iterations", type=int, default=8, help="training steps per run (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="plain/Ray pairs (default 3)")
    parser.add_argument("--batch", type=int, default=4, help="batch size, one worker (default 4)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for both (default 1: on a shared machine, more threads than free "
                             "cores make OpenMP spin-waits dominate)")
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")
    try:
        cfg = _config(args).check()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import ray
    import torch

    torch.set_num_threads(args.threads)
    from cluster.train import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(cfg, local=True, num_cpus=args.threads, log_to_driver=False)
    print(f"{cfg.model.backbone} at {cfg.data.crop_size}x{cfg.data.crop_size}, batch {args.batch}, "
          f"{args.iterations} steps per run, {args.threads} threads, amp={cfg.train.amp}", flush=True)
    plain, ray_ = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="cluster-bench-") as storage:
            for r in range(args.rounds):
                plain.append(run_plain(cfg))
                print(f"round {r + 1}  plain      {plain[-1][0]:7.2f} img/s  wall {plain[-1][1]:6.1f} s", flush=True)
                ray_.append(run_ray(cfg, storage, f"bench{r}"))
                print(f"round {r + 1}  ray train  {ray_[-1][0]:7.2f} img/s  wall {ray_[-1][1]:6.1f} s", flush=True)
    finally:
        ray.shutdown()
    speed = statistics.median(b[0] / a[0] for a, b in zip(plain, ray_))
    wall = statistics.median(b[1] / a[1] for a, b in zip(plain, ray_))
    print(f"median images/s plain {statistics.median(a[0] for a in plain):.2f}, "
          f"Ray Train {statistics.median(b[0] for b in ray_):.2f}")
    print(f"median ratio Ray/plain throughput {speed:.3f} (overhead {100 * (1 / speed - 1):+.1f}% per step); "
          f"wall time {wall:.2f}x (worker start, checkpoints)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
