"""What Ray Train costs: the same model, batch and loop in a plain process and under Ray Train (1 worker).

    python -m cluster.bench [--config configs/demo.yaml] [--iterations 8] [--rounds 3] [--set ...]

Runs alternate plain, Ray, plain, Ray, ... (machines here are shared, so timings drift; interleaving and the
median ratio cancel most of it). Throughput is `deeplab.train_loop`'s images/s over the training steps
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

from deeplab.cli import command


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The bench's own starting point, applied before the user's --set and flags (those win).
BENCH_SETTINGS = ["train.max_iterations=8", "train.batch_size=4", "cluster.cpus_per_worker=1", "cluster.num_workers=1"]


def _aliases():
    from deeplab.config import Alias

    return [Alias("--iterations", "train.max_iterations", "training steps per run (bench default 8)", metavar="N"),
            Alias("--batch", "train.batch_size", "batch size, one worker (bench default 4)", metavar="B"),
            Alias("--threads", "cluster.cpus_per_worker",
                  "intra-op threads for both (bench default 1: on a shared machine, more threads than free cores "
                  "make OpenMP spin-waits dominate)", metavar="T")]


def _config(args):
    """The experiment both sides run: one worker, one evaluation at the end (excluded from images/s)."""
    from deeplab.config import ConfigError, config_from_args, experiment_from_dict

    args.overrides = BENCH_SETTINGS + list(args.overrides)
    values = config_from_args(args).to_dict()
    t, c = values["train"], values["cluster"]
    t["eval_interval"] = t["log_interval"] = t["max_iterations"]
    values["data"]["synthetic_val"] = min(values["data"]["synthetic_val"], 2)
    c.update(num_workers=1, max_failures=0)
    if c["cpus_per_worker"] != int(c["cpus_per_worker"]) or c["cpus_per_worker"] < 1:
        raise ConfigError(f"--threads {c['cpus_per_worker']}: a whole number of threads >= 1")
    return experiment_from_dict(values, "bench config")


def run_plain(cfg) -> tuple:
    from deeplab.train_loop import train

    start = time.perf_counter()
    metrics = train(cfg)
    return metrics["images_per_s"], time.perf_counter() - start


def run_ray(cfg, storage: str, name: str) -> tuple:
    from cluster.train import build_trainer

    start = time.perf_counter()
    result = build_trainer(cfg, name=name, storage_path=storage).fit()
    return result.metrics["images_per_s"], time.perf_counter() - start


def build_parser() -> argparse.ArgumentParser:
    from deeplab.config import add_config_args

    parser = argparse.ArgumentParser(prog="python -m cluster.bench", description=__doc__.split("\n\n")[0])
    add_config_args(parser, aliases=_aliases())
    parser.set_defaults(config=os.path.join(ROOT, "configs", "demo.yaml"))
    parser.add_argument("--rounds", type=int, default=3, help="plain/Ray pairs (default 3)")
    return parser


@command
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = _config(args)  # a built config is a checked one

    import ray
    import torch

    threads = int(cfg.cluster.cpus_per_worker)
    torch.set_num_threads(threads)
    from cluster.train import init_ray

    init_ray(cfg, local=True, num_cpus=threads, log_to_driver=False)
    print(f"{cfg.model.backbone} at {cfg.data.crop_size}x{cfg.data.crop_size}, batch {cfg.train.batch_size}, "
          f"{cfg.train.max_iterations} steps per run, {threads} threads, amp={cfg.train.amp}", flush=True)
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
