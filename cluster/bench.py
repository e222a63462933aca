"""What Ray Train costs: the same model, batch and loop in a plain process and under Ray Train (1 worker).

    python -m cluster.bench [--config configs/demo.yaml] [--iterations 8] [--rounds 3] [--set ...]
    python -m cluster.bench --scaling [--cores N] [--iterations 20] [--rounds 2]

--scaling: whether a second worker pays for itself. On N cores (default: this machine's) it runs, interleaved
(A B C A B C ...), A a bare PyTorch loop (the same model, the global batch held in memory, SGD, the same amp, N
threads), B `cluster.train` with 1 worker x N CPUs and C with N workers x 1 CPU (SyncBatchNorm, DDP over gloo),
all at the config's global batch, and prints images/s (the median over each run's steps after 2 warm-up steps,
then over the rounds) and the ratio of each to the others.

Runs alternate plain, Ray, plain, Ray, ... (machines here are shared, so timings drift; interleaving and the
median ratio cancel most of it). Throughput is `deeplab.train_loop`'s images/s over the training steps
(evaluation excluded) in both; wall time adds, for Ray, starting the worker and reporting checkpoints.
Both use the same number of intra-op threads (Ray gives a worker OMP_NUM_THREADS = its CPUs).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

from cluster.ray_session import init_ray
from cluster.train import build_trainer
from deeplab.cli import command
from deeplab.config import Alias, ConfigError, add_config_args, config_from_args, experiment_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The bench's own starting point, applied before the user's --set and flags (those win).
BENCH_SETTINGS = ["train.max_iterations=8", "train.batch_size=4", "cluster.cpus_per_worker=1", "cluster.num_workers=1"]


def _aliases():
    return [Alias("--iterations", "train.max_iterations", "training steps per run (bench default 8)", metavar="N"),
            Alias("--batch", "train.batch_size", "batch size, one worker (bench default 4)", metavar="B"),
            Alias("--threads", "cluster.cpus_per_worker",
                  "intra-op threads for both (bench default 1: on a shared machine, more threads than free cores "
                  "make OpenMP spin-waits dominate)", metavar="T")]


def _config(args):
    """The experiment both sides run: one worker, one evaluation at the end (excluded from images/s)."""

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
    start = time.perf_counter()
    result = build_trainer(cfg, name=name, storage_path=storage).fit()
    return result.metrics["images_per_s"], time.perf_counter() - start


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench", description=__doc__.split("\n\n")[0])
    add_config_args(parser, aliases=_aliases())
    parser.set_defaults(config=os.path.join(ROOT, "configs", "demo.yaml"))
    parser.add_argument("--rounds", type=int, default=None,
                        help="plain/Ray pairs (default 3); with --scaling, A B C rounds (default 2)")
    parser.add_argument("--scaling", action="store_true",
                        help="bare loop vs 1 worker x N CPUs vs N workers x 1 CPU, interleaved (see above)")
    parser.add_argument("--cores", type=int, default=None, metavar="N",
                        help="with --scaling: N (default: the CPUs this process may run on)")
    return parser


# ---------------------------------------------------------------------------------------------------------
# --scaling: a bare loop, 1 worker x N CPUs, N workers x 1 CPU

SCALING_ITERATIONS = 20


def _scaling_config(args, cores: int):
    """The config's model, data and global batch; one evaluation (excluded) at the end of each run."""

    if cores < 1:
        raise ConfigError(f"--cores {cores}: a number of cores >= 1")
    args.overrides = [f"train.max_iterations={SCALING_ITERATIONS}"] + list(args.overrides)
    cfg = config_from_args(args)
    t = cfg.train
    t.eval_interval = t.log_interval = t.max_iterations
    cfg.data.synthetic_val = min(cfg.data.synthetic_val, 2)
    cfg.cluster.max_failures = 0
    if t.batch_size % cores:
        raise ConfigError(f"train.batch_size={t.batch_size}: --scaling needs a global batch that {cores} workers "
                          "share evenly")
    cfg.check()
    return cfg


def run_bare(cfg, threads: int) -> float:
    """Images/s of a bare loop: the config's model and global batch (held in memory), SGD, the same amp, in this
    process with ``threads`` intra-op threads; the median over the steps after 2 warm-up steps."""
    import torch
    import torch.nn.functional as F

    from deeplab.data import build_dataset
    from deeplab.model import build_model
    from deeplab.train_loop import Meter, resolve_amp

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    data = build_dataset(cfg.data, cfg.data.train_split, train=True)
    samples = [data[i] for i in range(cfg.train.batch_size)]
    images = torch.stack([im for im, _ in samples]).contiguous(memory_format=torch.channels_last)
    masks = torch.stack([m for _, m in samples])
    model = build_model(cfg.model).to(memory_format=torch.channels_last).train()
    t = cfg.train
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    amp = resolve_amp(t.amp, torch.device("cpu"))
    meter = Meter(0)
    for _ in range(t.max_iterations):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), masks, ignore_index=cfg.data.ignore_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.step(loss.item(), time.perf_counter() - start, len(images))
    return meter.median_speed


def run_workers(cfg, workers: int, cpus: int, storage: str, name: str) -> float:
    """Images/s (median over steps after warm-up) of `cluster.train` with ``workers`` x ``cpus``."""

    cfg = copy.deepcopy(cfg)
    cfg.cluster.num_workers, cfg.cluster.cpus_per_worker = workers, cpus
    result = build_trainer(cfg, name=name, storage_path=storage).fit()
    return result.metrics["images_per_s_median"]


def scaling_table(speeds: dict) -> str:
    """``speeds``: label -> images/s; one row per setup with its ratio to each setup."""
    labels = list(speeds)
    short = [label.split(",")[0] for label in labels]
    lines = [f"{'setup':<28s}{'images/s':>10s}" + "".join(f"{'vs ' + s:>22s}" for s in short)]
    for label in labels:
        ratios = "".join(f"{speeds[label] / speeds[other]:>21.2f}x" for other in labels)
        lines.append(f"{label:<28s}{speeds[label]:>10.2f}{ratios}")
    return "\n".join(lines)


def run_scaling(args) -> int:
    """A B C A B C ...: the bare loop, 1 worker x N CPUs, N workers x 1 CPU; the median of each, the ratios."""
    cores = args.cores or len(os.sched_getaffinity(0))
    cfg = _scaling_config(args, cores)
    rounds = 2 if args.rounds is None else args.rounds

    import ray

    init_ray(cfg, local=True, num_cpus=cores, log_to_driver=False)
    labels = [f"bare loop, {cores} threads", f"1 worker x {cores} CPUs", f"{cores} workers x 1 CPU"]
    print(f"{cfg.model.backbone} OS{cfg.model.output_stride} at {cfg.data.crop_size}x{cfg.data.crop_size}, global "
          f"batch {cfg.train.batch_size}, amp={cfg.train.amp}, {cfg.train.max_iterations} steps per run, {rounds} "
          f"rounds on {cores} cores; load average {os.getloadavg()[0]:.2f}", flush=True)
    runs: dict = {label: [] for label in labels}
    try:
        with tempfile.TemporaryDirectory(prefix="cluster-bench-") as storage:
            for r in range(rounds):
                for label, run in zip(labels, (lambda: run_bare(cfg, cores),
                                               lambda r=r: run_workers(cfg, 1, cores, storage, f"one{r}"),
                                               lambda r=r: run_workers(cfg, cores, 1, storage, f"many{r}"))):
                    runs[label].append(run())
                    print(f"round {r + 1}  {label:<26s}{runs[label][-1]:8.2f} img/s", flush=True)
    finally:
        ray.shutdown()
    print(f"\nmedian images/s per step (after 2 warm-up steps), {rounds} interleaved rounds; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(scaling_table({label: statistics.median(v) for label, v in runs.items()}))
    return 0


@command
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.scaling:
        return run_scaling(args)
    args.rounds = 3 if args.rounds is None else args.rounds
    cfg = _config(args)  # a built config is a checked one

    import ray
    import torch

    threads = int(cfg.cluster.cpus_per_worker)
    torch.set_num_threads(threads)

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
