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
import shutil
import sys
from typing import Optional

from cluster.console import project_console, quiet_worker_console, ray_init_options
from deeplab.config import ConfigError, ExperimentConfig, add_config_args, experiment_from_dict, load_config

CHECKPOINT_FILE = "model.ckpt"
BEST_FILE = "best.ckpt"


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
    from deeplab.checkpoint import unwrap
    from deeplab.engine import Worker, train

    cfg = experiment_from_dict(config["experiment"])
    if not config.get("verbose"):
        quiet_worker_console()
    context = ray.train.get_context()
    world_size = context.get_world_size()
    device = ray.train.torch.get_device()

    synchronized = world_size > 1 and not cfg.train.freeze_bn  # frozen BN uses running stats: nothing to sync

    def prepare_model(model):
        if synchronized:
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
                      latest_checkpoint=latest_checkpoint, log_dir=config.get("log_dir"),
                      synchronized_bn=synchronized))


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
                cause = error
                while cause is not None and not isinstance(cause, FloatingPointError):
                    cause = cause.__cause__
                if isinstance(cause, FloatingPointError) or "FloatingPointError" in str(error):
                    message = next((line for line in str(error).splitlines() if "FloatingPointError" in line),
                                   str(error).splitlines()[-1] if str(error) else "loss is not finite")
                    raise FloatingPointError(message.split("FloatingPointError:")[-1].strip())

    return StopOnDivergence()


# ---------------------------------------------------------------------------------------------------------
# The driver


def build_trainer(cfg: ExperimentConfig, *, name: Optional[str] = None, storage_path: Optional[str] = None,
                  callbacks: list = (), max_failures: Optional[int] = None, verbose: bool = False):
    """A TorchTrainer for this experiment (Ray Train V2). ``name``/``storage_path`` pin the run directory
    ``<storage_path>/<name>`` (defaults: cluster.name, absolute ``runs/`` of the current directory)."""
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
        checkpoint_config=ray.train.CheckpointConfig(  # the best by val mIoU; Ray also keeps the latest
            num_to_keep=1, checkpoint_score_attribute="val_miou", checkpoint_score_order="max"),
        failure_config=ray.train.FailureConfig(max_failures=c.max_failures if max_failures is None else max_failures),
        callbacks=[*callbacks, _stop_on_divergence_callback()],  # last: the others still see the failure
        # Train V2 reroutes print() through its logger *and* the original stream: each line twice
        worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        # Ray Train's INFO lines (process groups, devices, each report) stay in its log files unless --verbose
        logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
    )
    loop_config = {"experiment": cfg.to_dict(), "log_dir": log_dir, "verbose": verbose}
    return TorchTrainer(_train_fn, train_loop_config=loop_config,
                        scaling_config=scaling, torch_config=TorchConfig(timeout_s=c.collective_timeout_s),
                        run_config=run)


def _copy_best(result, destination: str) -> Optional[str]:
    """Copy the best checkpoint's model.ckpt to ``destination`` atomically (temp name, then rename)."""
    import pyarrow.fs

    best = result.get_best_checkpoint("val_miou", "max") if result.best_checkpoints else result.checkpoint
    if best is None:
        return None
    source = f"{best.path}/{CHECKPOINT_FILE}"
    if isinstance(best.filesystem, pyarrow.fs.LocalFileSystem):
        tmp = os.path.join(os.path.dirname(destination), f".{os.path.basename(destination)}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, destination)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:  # object stores replace an object in one step
        best.filesystem.copy_file(source, destination.split("://", 1)[-1])
    return destination


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


def init_ray(cfg: ExperimentConfig, local: bool = False, **kwargs) -> None:
    """Join the cluster named by cluster.address / RAY_ADDRESS / a running local one, else start one
    (``local``: always start a fresh local one). A local dashboard moves off 8265 when that port is taken."""
    import ray

    if ray.is_initialized():
        return
    address = "local" if local else cfg.cluster.address
    if address is None and not os.environ.get("RAY_ADDRESS"):
        try:  # an existing cluster on this machine (ray start / ray up)
            ray.init(address="auto", **kwargs)
            return
        except ConnectionError:
            address = "local"
    if address == "local" and _port_in_use(8265):
        kwargs.setdefault("dashboard_port", _free_port())
    ray.init(address=address, **kwargs)


def run_logs_dir(cfg: ExperimentConfig) -> Optional[str]:
    """RUN_DIR/logs: the full console and Ray Train's log files (None for remote storage)."""
    storage = resolve_storage_path(cfg.cluster.storage_path)
    return None if _is_remote(storage) else os.path.join(storage, cfg.cluster.name, "logs")


def train(cfg: ExperimentConfig, *, callbacks: list = (), checked: bool = False, verbose: bool = False):
    """Run the experiment to the end (resuming a previous run of the same name) and write best.ckpt.
    ``callbacks``: extra Ray Train UserCallbacks (they run in the controller); ``checked``: the config already
    passed its checks and preflight; ``verbose``: Ray's own lines on the console too (they are always in the
    run dir's logs/ and Ray's session folder)."""
    if not checked:
        cfg.check()
        preflight(cfg)
    init_ray(cfg, **ray_init_options(verbose))
    storage = resolve_storage_path(cfg.cluster.storage_path)
    run_dir = f"{storage.rstrip('/')}/{cfg.cluster.name}"
    if not _is_remote(storage) and os.path.isdir(run_dir):
        print(f"run directory {run_dir} exists: resuming that run where it stopped", flush=True)
    trainer = build_trainer(cfg, name=cfg.cluster.name, storage_path=storage, callbacks=callbacks, verbose=verbose)
    with project_console(run_logs_dir(cfg), verbose):
        result = trainer.fit()
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--num-workers", type=int, help="Ray Train workers (cluster.num_workers)")
    parser.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker (cluster.use_gpu)")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker (cluster.cpus_per_worker)")
    parser.add_argument("--storage-path", help="run storage: a local/NFS folder or s3://... (cluster.storage_path)")
    parser.add_argument("--name", help="run name; the same name and storage path resume a run (cluster.name)")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's own lines on the console too (always in RUN_DIR/logs and Ray's session folder)")
    args = parser.parse_args(argv)

    from deeplab.checkpoint import CheckpointError
    from deeplab.data import DatasetError

    try:
        cfg = load_config(args.config, args.overrides)
        for flag in ("num_workers", "use_gpu", "cpus_per_worker", "storage_path", "name"):
            if getattr(args, flag) is not None:
                setattr(cfg.cluster, flag, getattr(args, flag))
        cfg.check()
        preflight(cfg)
    except (ConfigError, CheckpointError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import ray.train

    try:
        train(cfg, checked=True, verbose=args.verbose)
    except ray.train.TrainingFailedError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "Error:" in line), lines[-1] if lines else type(e).__name__)
        where = run_logs_dir(cfg)
        print(f"error: training failed: {reason.strip()}" + (f" (tracebacks: {where}/console.log)" if where else ""),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
