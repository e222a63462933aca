"""Train DeepLabv3 on N Ray workers: ``python -m cluster.train --config configs/demo.yaml``.

The config becomes a Ray Train ``TorchTrainer``: one worker per process/GPU running `deeplab.engine.train`,
DDP with synchronized BatchNorm (``torch.nn.SyncBatchNorm`` on CUDA, `cluster.syncbn.SyncBatchNorm2d` on
CPU/gloo), the best checkpoint by validation mIoU kept, lost workers replaced and resumed from the last
checkpoint. The run is pinned to ``<storage_path>/<name>``: running the same command again after the driver
dies resumes it. At the end the best checkpoint is copied to ``<storage_path>/<name>/best.ckpt``.

Connects to a running cluster (``cluster.address``, ``RAY_ADDRESS``, or one started with ``ray start`` /
``ray up`` on this machine) and starts a local one otherwise.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from typing import Optional

from deeplab.cli import command
from deeplab.config import Alias, ConfigError, ExperimentConfig, add_config_args, config_from_args, experiment_from_dict
from deeplab.fileio import copy_file_atomic, ensure_dir

BEST_FILE = "best.ckpt"
ALIASES = [
    Alias("--num-workers", "cluster.num_workers", "Ray Train workers", metavar="N"),
    Alias("--use-gpu", "cluster.use_gpu", "one GPU per worker", switch=True),
    Alias("--cpus-per-worker", "cluster.cpus_per_worker", "CPUs reserved per worker", metavar="C"),
    Alias("--storage-path", "cluster.storage_path", "run storage: a local/NFS folder or s3://...", metavar="P"),
    Alias("--name", "cluster.name", "run name; the same name and storage path resume a run"),
]


def _is_remote(path: str) -> bool:
    return "://" in path


def resolve_storage_path(storage_path: str) -> str:
    """Remote URIs (s3://, gs://, ...) as given; local paths made absolute against the current directory."""
    return storage_path if _is_remote(storage_path) else os.path.abspath(os.path.expanduser(storage_path))


def _absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Workers may run in another directory: make the user's relative file paths absolute here."""
    cfg = copy.deepcopy(cfg)
    for section, name in (("data", "root"), ("train", "init_from"), ("train", "pretrained_backbone")):
        obj = getattr(cfg, section)
        value = getattr(obj, name)
        if value and not _is_remote(value):
            setattr(obj, name, os.path.abspath(os.path.expanduser(value)))
    return cfg


# ---------------------------------------------------------------------------------------------------------
# What runs in each Ray worker


def _train_fn(config: dict) -> None:
    """One Ray Train worker: hand `deeplab.engine.train` the Ray-specific pieces."""
    import pyarrow.fs
    import ray.train
    import ray.train.torch

    from cluster.syncbn import convert_sync_batchnorm, revert_sync_batchnorm
    from deeplab.checkpoint import CHECKPOINT_FILE, unwrap
    from deeplab.engine import Worker, train

    cfg = experiment_from_dict(config["experiment"])
    context = ray.train.get_context()
    world_size = context.get_world_size()
    device = ray.train.torch.get_device()

    def prepare_model(model):
        if world_size > 1 and not cfg.train.freeze_bn:  # frozen BN uses running stats: nothing to sync
            model = convert_sync_batchnorm(model, device.type)
        return ray.train.torch.prepare_model(model)

    def plain_model(model):  # a copy: reverting in place would swap the training model's modules
        return revert_sync_batchnorm(copy.deepcopy(unwrap(model)))

    def report(metrics: dict, checkpoint_dir: Optional[str]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def latest_checkpoint() -> Optional[str]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            folder = checkpoint.path
        else:
            folder = checkpoint.to_directory()  # download from S3/GCS
        return os.path.join(folder, CHECKPOINT_FILE)

    train(cfg, Worker(rank=context.get_world_rank(), world_size=world_size, device=device,
                      prepare_model=prepare_model, plain_model=plain_model, report=report,
                      latest_checkpoint=latest_checkpoint, log_dir=config.get("log_dir")))


def divergence_reason(error: BaseException) -> Optional[str]:
    """The worker's message if a run failed because the loss went NaN/inf (a FloatingPointError), else None.

    Ray wraps worker errors (ControllerError.controller_failure, WorkerGroupError.worker_failures,
    RayTaskError.cause, chained causes) and sometimes keeps only their text: look through all of them."""
    seen, stack = set(), [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is FloatingPointError:  # exactly ours: Ray's wrappers may subclass it with a traceback text
            return (str(e).strip().splitlines() or ["non-finite loss"])[-1]
        line = next((ln for ln in str(e).splitlines() if "FloatingPointError:" in ln), None)
        if line:
            return line.split("FloatingPointError:")[-1].strip() or "non-finite loss"
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None)]
        stack += list((getattr(e, "worker_failures", None) or {}).values())
    return None


def _stop_on_divergence_callback():
    """A controller callback that fails the run at once when a worker raises FloatingPointError (NaN loss).

    Ray retries any worker error up to max_failures times, each retry resuming from the last checkpoint,
    and a diverged run replays deterministically to the same NaN. Raising here turns the failure into a
    non-retryable controller error; should Ray change that, the run still fails after max_failures
    short replays.
    """
    from ray.train import UserCallback

    class StopOnDivergence(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for error in worker_exceptions.values():
                reason = divergence_reason(error)
                if reason:
                    raise FloatingPointError(reason)

    return StopOnDivergence()


# ---------------------------------------------------------------------------------------------------------
# The driver


def build_trainer(cfg: ExperimentConfig, *, name: Optional[str] = None, storage_path: Optional[str] = None,
                  callbacks: list = (), max_failures: Optional[int] = None, score: tuple = ("val_miou", "max")):
    """A TorchTrainer for this experiment (Ray Train V2). ``name``/``storage_path`` pin the run directory
    ``<storage_path>/<name>`` (defaults: cluster.name, absolute ``runs/`` of the current directory).
    ``score``: (metric, max|min) that ranks checkpoints; Ray keeps the best one and the latest."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg.check()  # every config mistake answered here, on the driver, not by each worker
    cfg = _absolute_paths(cfg)
    c = cfg.cluster
    name = name or c.name
    storage = resolve_storage_path(storage_path or c.storage_path)
    log_dir = None if _is_remote(storage) else os.path.join(storage, name, "tensorboard")
    resources = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = 1
    scaling = ray.train.ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                      resources_per_worker=resources, placement_strategy=c.placement_strategy)
    run = ray.train.RunConfig(
        name=name,
        storage_path=storage,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=score[0], checkpoint_score_order=score[1]),
        failure_config=ray.train.FailureConfig(max_failures=c.max_failures if max_failures is None else max_failures),
        callbacks=[*callbacks, _stop_on_divergence_callback()],  # last: the others still see the failure
        # Train V2 reroutes print() through its logger *and* the original stream: each line twice
        worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
    )
    return TorchTrainer(_train_fn, train_loop_config={"experiment": cfg.to_dict(), "log_dir": log_dir},
                        scaling_config=scaling, torch_config=TorchConfig(timeout_s=c.collective_timeout_s),
                        run_config=run)


def copy_checkpoint(checkpoint_dir: str, destination: str, filesystem=None) -> str:
    """Copy a Ray checkpoint folder's model.ckpt to ``destination`` whole or not at all: atomically on a local
    filesystem (``filesystem`` None or pyarrow's local one), in one object-store put on S3/GCS."""
    import pyarrow.fs

    from deeplab.checkpoint import CHECKPOINT_FILE  # torch: kept off the --help path

    source = f"{checkpoint_dir}/{CHECKPOINT_FILE}"
    if filesystem is None or isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        ensure_dir(os.path.dirname(os.path.abspath(destination)))
        copy_file_atomic(source, destination)
    else:  # object stores replace an object in one step
        filesystem.copy_file(source, destination.split("://", 1)[-1])
    return destination


def _copy_best(result, destination: str) -> Optional[str]:
    """The run's best checkpoint (by val mIoU; the latest when none was scored) copied to ``destination``."""
    best = result.get_best_checkpoint("val_miou", "max") if result.best_checkpoints else result.checkpoint
    return None if best is None else copy_checkpoint(best.path, destination, best.filesystem)


def _print_summary(cfg: ExperimentConfig, result, best_path: Optional[str]) -> None:
    from deeplab.data import dataset_info

    metrics = result.metrics or {}
    best = max((m for _, m in result.best_checkpoints or []), key=lambda m: m.get("val_miou", -1), default=metrics)
    names = getattr(dataset_info(cfg.data), "class_names", None) or []
    iou = best.get("val_iou") or []
    print(f"\nrun {result.path}")
    print(f"iterations {metrics.get('iteration')}  final val mIoU {metrics.get('val_miou', float('nan')):.4f}  "
          f"best val mIoU {best.get('val_miou', float('nan')):.4f} (iteration {best.get('iteration')})")
    if iou:
        print("per-class IoU of the best checkpoint:")
        for i, value in enumerate(iou):
            label = names[i] if i < len(names) else f"class {i}"
            shown = "  n/a (absent)" if value is None or math.isnan(value) else f"{value:7.4f}"
            print(f"  {i:3d} {label:<16s}{shown}")
    if best_path:
        print(f"best checkpoint: {best_path}")


def _port_in_use(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recorded_cluster() -> Optional[str]:
    """The address ``ray start`` / ``ray up`` recorded on this machine (Ray's current-cluster file in its temp
    folder), or None. Not ``ray.init(address="auto")``: that joins *any* Ray instance it sees running here,
    another user's local one too. Ray has no public call for this record."""
    from ray._private.services import find_bootstrap_address

    return find_bootstrap_address(None)


def init_ray(cfg: ExperimentConfig, local: bool = False, num_cpus: Optional[int] = None, **kwargs) -> None:
    """Join the cluster named by cluster.address / RAY_ADDRESS / the one started on this machine with ``ray start``
    or ``ray up``, else start a local one (``local``: always a fresh local one). ``kwargs`` go to ``ray.init``.

    A local cluster gets ``num_cpus`` logical CPUs (default: this machine's), no GPUs unless cluster.use_gpu,
    its dashboard on 8265 or a free port when that is taken, and its processes are told that address: Ray
    Train's placement-group cleaner (which frees an early-stopped trial's workers) finds the cluster through the
    dashboard, and with several local Ray instances on one machine it otherwise picks the newest one, never
    frees the resources and the next trial waits forever.
    """
    import ray

    if ray.is_initialized():
        return
    if local:  # its processes must not follow RAY_ADDRESS to another cluster
        os.environ.pop("RAY_ADDRESS", None)
    elif cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.cluster.address or os.environ["RAY_ADDRESS"], **kwargs)
        return
    elif _recorded_cluster():
        try:
            ray.init(address=_recorded_cluster(), **kwargs)
            return
        except ConnectionError:  # the record of a cluster since stopped
            pass
    port = _free_port() if _port_in_use(8265) else 8265
    ray.init(address="local", num_cpus=num_cpus, num_gpus=None if cfg.cluster.use_gpu else 0, dashboard_port=port,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}, **kwargs)


def train(cfg: ExperimentConfig, *, callbacks: list = (), checked: bool = False):
    """Run the experiment to the end (resuming a previous run of the same name) and write best.ckpt.
    ``callbacks``: extra Ray Train UserCallbacks (they run in the controller); ``checked``: the config already
    passed its checks and preflight."""
    if not checked:
        cfg.check()
        preflight(cfg)
    init_ray(cfg)
    storage = resolve_storage_path(cfg.cluster.storage_path)
    run_dir = f"{storage.rstrip('/')}/{cfg.cluster.name}"
    if not _is_remote(storage) and os.path.isdir(run_dir):
        print(f"run directory {run_dir} exists: resuming that run where it stopped", flush=True)
    result = build_trainer(cfg, name=cfg.cluster.name, storage_path=storage, callbacks=callbacks).fit()
    best_path = _copy_best(result, f"{run_dir}/{BEST_FILE}")
    _print_summary(cfg, result, best_path)
    return result


def preflight(cfg: ExperimentConfig) -> None:
    """Open the datasets and checkpoints once on the driver, so a bad path fails in one line here."""
    from deeplab.checkpoint import load_checkpoint
    from deeplab.data import build_dataset, dataset_info

    cfg = _absolute_paths(cfg)
    num_classes = dataset_info(cfg.data).num_classes
    if num_classes != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but data ({cfg.data.dataset}) has "
                          f"{num_classes} classes")
    build_dataset(cfg.data, cfg.data.train_split, train=True)
    build_dataset(cfg.data, cfg.data.val_split, train=False)
    if cfg.train.init_from and not _is_remote(cfg.train.init_from):
        load_checkpoint(cfg.train.init_from)


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, aliases=ALIASES)
    cfg = config_from_args(parser.parse_args(argv))
    cfg.check()
    preflight(cfg)

    import ray.train

    try:
        train(cfg, checked=True)
    except ray.train.TrainingFailedError as e:
        reason = divergence_reason(e)
        print(f"error: training failed: {reason or _first_error_line(e)}", file=sys.stderr)
        return 1
    return 0


def _first_error_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "Error:" in line), lines[-1] if lines else type(error).__name__)


if __name__ == "__main__":
    sys.exit(main())
