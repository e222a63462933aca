"""Train DeepLabv3 on N Ray workers: ``python -m cluster.train --config configs/demo.yaml``.

The config becomes a Ray Train ``TorchTrainer``: one worker per process/GPU running `deeplab.train_loop.train`
(`cluster.worker`), DDP with synchronized BatchNorm (``torch.nn.SyncBatchNorm`` on CUDA,
`cluster.syncbn.SyncBatchNorm2d` on CPU/gloo), the best checkpoint by validation mIoU kept, lost workers replaced
and resumed from the last checkpoint. ``--num-workers MIN-MAX`` makes the group elastic: it starts once MIN
workers fit, grows towards MAX as nodes join and shrinks when they leave, each time from the latest checkpoint,
with the same global batch. The run is pinned to ``<storage_path>/<name>``: running the same command again after
the driver dies resumes it. At the end the best checkpoint is copied to ``<storage_path>/<name>/best.ckpt`` and
what the run did to ``summary.json`` beside it.

Connects to a running cluster (``cluster.address``, ``RAY_ADDRESS``, or one started with ``ray start`` /
``ray up`` on this machine) and starts a local one otherwise.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import threading
import uuid
from typing import Optional

from cluster import ray_internals
from cluster.console import project_console, ray_init_options
from cluster.ray_session import init_ray
from cluster.storage import RunFolder, resolve_storage_path, run_folder
from deeplab.cli import command, error_line, on_interrupt
from deeplab.config import Alias, ConfigError, ExperimentConfig, add_config_args, config_from_args
from deeplab.fileio import copy_file_atomic, ensure_dir, is_uri, write_text_atomic
from deeplab.pause import pause_for_test

BEST_FILE = "best.ckpt"
SUMMARY_FILE = "summary.json"
ALIASES = [
    Alias("--num-workers", "cluster.num_workers", "Ray Train workers: N, or MIN-MAX to grow and shrink with the "
          "cluster (elastic)", metavar="N|MIN-MAX"),
    Alias("--use-gpu", "cluster.use_gpu", "one GPU per worker", switch=True),
    Alias("--cpus-per-worker", "cluster.cpus_per_worker", "CPUs reserved per worker", metavar="C"),
    Alias("--storage-path", "cluster.storage_path", "run storage: a local/NFS folder or s3://...", metavar="P"),
    Alias("--name", "cluster.name", "run name; the same name and storage path resume a run"),
]


def _absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Workers may run in another directory: make the user's relative file paths absolute here."""
    cfg = copy.deepcopy(cfg)
    for section, name in (("data", "root"), ("train", "init_from"), ("train", "pretrained_backbone")):
        obj = getattr(cfg, section)
        value = getattr(obj, name)
        if value and not is_uri(value):
            setattr(obj, name, os.path.abspath(os.path.expanduser(value)))
    return cfg


class TrainingCodeError(RuntimeError):
    """A worker failed in the training code itself (a bad data file found mid-run, a shape error): a replay
    from the last checkpoint would fail the same way, so the run ends at once with this one-line reason."""


# Words of the errors the surviving workers raise when a peer (its process or node) is gone mid-collective.
PEER_LOST = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "peer")


def _error_chain(error: BaseException):
    """Every exception inside Ray's wrappers (ControllerError.controller_failure, WorkerGroupError.worker_failures,
    RayTaskError.cause, chained causes), each once."""
    seen, stack = set(), [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None)]
        stack += list((getattr(e, "worker_failures", None) or {}).values())


def _message_of(error: BaseException, kind: type) -> Optional[str]:
    """The message of a ``kind`` error anywhere in the chain; Ray sometimes keeps only the text."""
    for e in _error_chain(error):
        if type(e) is kind:  # exactly ours: Ray's wrappers may subclass it with a traceback text
            return error_line(e, limit=1000)
        line = next((ln for ln in str(e).splitlines() if f"{kind.__name__}:" in ln), None)
        if line:
            return line.split(f"{kind.__name__}:")[-1].strip() or kind.__name__
    return None


def divergence_reason(error: BaseException) -> Optional[str]:
    """The worker's message if a run failed because the loss went NaN/inf (a FloatingPointError), else None."""
    return _message_of(error, FloatingPointError)


def training_code_reason(error: BaseException) -> Optional[str]:
    """The one-line reason if a run failed in its training code (TrainingCodeError), else None."""
    return _message_of(error, TrainingCodeError)


def _is_lost_worker(error: BaseException) -> bool:
    """Whether a worker failure may be a lost process or node (retry it) rather than the training code.
    Ray hands the callback what the training code raised as is, and its own errors for dead workers."""
    from ray.exceptions import RayError

    if isinstance(error, RayError) or ray_internals.is_ray_train_error(error):
        return True  # a dead actor, a failed health check: the process or its node is gone
    if type(error).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError"):
        return True
    return any(word in str(error).lower() for word in PEER_LOST)


def _stop_on_training_code_error_callback():
    """A controller callback that ends the run at once when the training code failed, not a worker or node.

    Ray retries any worker error up to max_failures times, each retry resuming from the last checkpoint, and a
    diverged loss or a bad file replays deterministically to the same failure. Raising here turns it into a
    non-retryable controller error. Only failures that may be a lost worker (a dead actor, a peer gone
    mid-collective) use max_failures.
    """
    from ray.train import UserCallback

    class StopOnTrainingCodeError(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for error in worker_exceptions.values():
                reason = divergence_reason(error)
                if reason:
                    raise FloatingPointError(reason)
            if worker_exceptions and not any(map(_is_lost_worker, worker_exceptions.values())):
                rank, error = min(worker_exceptions.items())
                raise TrainingCodeError(f"worker {rank}: {error_line(error, limit=1000, with_type=True)}")

    return StopOnTrainingCodeError()


# ---------------------------------------------------------------------------------------------------------
# The driver


def build_trainer(cfg: ExperimentConfig, *, name: Optional[str] = None, storage_path: Optional[str] = None,
                  callbacks: list = (), max_failures: Optional[int] = None, score: tuple = ("val_miou", "max"),
                  verbose: bool = False):
    """A TorchTrainer for this experiment (Ray Train V2). ``name``/``storage_path`` pin the run directory
    ``<storage_path>/<name>`` (defaults: cluster.name, absolute ``runs/`` of the current directory).
    ``score``: (metric, max|min) that ranks checkpoints; Ray keeps the best one and the latest."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.worker import train_worker

    cfg.check()  # every config mistake answered here, on the driver, not by each worker
    cfg = _absolute_paths(cfg)
    c = cfg.cluster
    name = name or c.name
    storage = resolve_storage_path(storage_path or c.storage_path)
    folder = run_folder(storage, name)
    log_dir = folder.child("tensorboard").path if folder.local else None
    resources = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = 1
    scaling = ray.train.ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,  # (min, max): elastic
                                      resources_per_worker=resources, placement_strategy=c.placement_strategy,
                                      elastic_resize_monitor_interval_s=c.resize_interval_s)
    run = ray.train.RunConfig(
        name=name,
        storage_path=storage,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=score[0], checkpoint_score_order=score[1]),
        failure_config=ray.train.FailureConfig(max_failures=c.max_failures if max_failures is None else max_failures),
        callbacks=[*callbacks, _stop_on_training_code_error_callback()],  # last: the others still see the failure
        # Train V2 reroutes print() through its logger *and* the original stream: each line twice
        worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        # Ray Train's INFO lines (process groups, devices, each report) stay in its log files unless --verbose
        logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
    )
    loop_config = {"experiment": cfg.to_dict(), "log_dir": log_dir, "verbose": verbose,
                   "run_key": folder.url}
    return TorchTrainer(train_worker, train_loop_config=loop_config,
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


def _copy_best(result, destination: RunFolder) -> Optional[str]:
    """The run's best checkpoint (by val mIoU; the latest when none was scored) copied to ``destination``;
    returns its URL."""
    best = result.get_best_checkpoint("val_miou", "max") if result.best_checkpoints else result.checkpoint
    if best is None:
        return None
    copy_checkpoint(best.path, destination.path, best.filesystem)
    return destination.url


def _summary(result, folder: RunFolder, best_path: Optional[str]) -> dict:
    """What the run did, for people and scripts: iterations, final and best val mIoU, the best checkpoint, and
    every restart from a checkpoint (lost node, resize) with the iterations it had to do again."""
    metrics = result.metrics or {}
    best = max((m for _, m in result.best_checkpoints or []), key=lambda m: m.get("val_miou", -1), default=metrics)
    resumes = metrics.get("resumes") or []
    unknown = any(r.get("reached_iteration") is None for r in resumes)  # e.g. a new driver on an object store
    redone = None if unknown else sum(r["reached_iteration"] - r["checkpoint_iteration"] for r in resumes)
    return {"run": folder.url, "iterations": metrics.get("iteration"), "final_val_miou": metrics.get("val_miou"),
            "best_val_miou": best.get("val_miou"), "best_iteration": best.get("iteration"),
            "best_val_iou": best.get("val_iou") or [], "best_checkpoint": best_path, "resumes": resumes,
            "redone_iterations": redone}


def _print_summary(cfg: ExperimentConfig, summary: dict) -> None:
    from deeplab.data import dataset_info
    from deeplab.train_loop import describe_resume

    names = getattr(dataset_info(cfg.data), "class_names", None) or []
    final, best = (float("nan") if v is None else v for v in (summary["final_val_miou"], summary["best_val_miou"]))
    print(f"\nrun {summary['run']}")
    print(f"iterations {summary['iterations']}  final val mIoU {final:.4f}  best val mIoU {best:.4f} "
          f"(iteration {summary['best_iteration']})")
    if summary["resumes"]:
        redone = summary["redone_iterations"]
        print(f"restarted {len(summary['resumes'])} time(s) from a checkpoint, "
              f"{'an unknown number of' if redone is None else redone} iteration(s) done again: "
              + "; ".join(describe_resume(r) for r in summary["resumes"]))
    if summary["best_val_iou"]:
        print("per-class IoU of the best checkpoint:")
        for i, value in enumerate(summary["best_val_iou"]):
            label = names[i] if i < len(names) else f"class {i}"
            shown = "  n/a (absent)" if value is None or math.isnan(value) else f"{value:7.4f}"
            print(f"  {i:3d} {label:<16s}{shown}")
    if summary["best_checkpoint"]:
        print(f"best checkpoint: {summary['best_checkpoint']}")


def _write_summary(summary: dict, folder: RunFolder) -> None:
    """<run>/summary.json, whole or not at all (a local atomic rename; one object-store put on S3/GCS)."""

    text = json.dumps(summary, indent=1, default=str)
    if folder.local:
        write_text_atomic(os.path.join(folder.path, SUMMARY_FILE), text)
    else:
        with folder.filesystem.open_output_stream(folder.child(SUMMARY_FILE).path) as f:
            f.write(text.encode())


STORAGE_MARKER = ".storage-check"


def _sees_file(path: str) -> bool:
    return os.path.isfile(path)


def _worker_nodes(cfg: ExperimentConfig) -> list:
    """The live nodes a worker of this run may be placed on: those with a GPU for a GPU run, else with CPUs."""
    import ray

    need = "GPU" if cfg.cluster.use_gpu else "CPU"
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(need, 0) > 0]


def check_storage_visible(cfg: ExperimentConfig, storage: str, timeout_s: float = 120.0) -> None:
    """Refuse, in one line, a storage folder that a node the run may use cannot see.

    Ray Train checks this only at the first checkpoint upload, hours into a run. Same test, up front: the
    driver writes a marker into ``storage`` and a task pinned to each other node looks for it. Object stores
    (s3://, gs://) and a shared filesystem mounted at the same path on every node pass; nodes that join later
    are checked by Ray itself at their first upload."""

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if is_uri(storage):
        return
    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in _worker_nodes(cfg) if n["NodeID"] != here]
    if not nodes:
        return
    marker = os.path.join(storage, f"{STORAGE_MARKER}-{uuid.uuid4().hex}")
    try:
        ensure_dir(storage)
        write_text_atomic(marker, "written by the driver; each node looks for it\n")
    except OSError as e:
        raise ConfigError(f"cluster.storage_path={storage}: cannot write there ({e.strerror or e})",
                          ("cluster.storage_path",)) from None
    look = ray.remote(num_cpus=0, max_retries=0)(_sees_file)
    try:
        pending = [look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                   .remote(marker) for n in nodes]
        seen = ray.get(pending, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(f"cluster.storage_path={storage}: a node did not answer the storage check within "
                          f"{timeout_s:.0f} s", ("cluster.storage_path",)) from None
    finally:
        os.remove(marker)
    blind = next((n for n, ok in zip(nodes, seen) if not ok), None)
    if blind is not None:
        raise ConfigError(
            f"cluster.storage_path={storage} is not visible on node {blind['NodeManagerAddress']} (id "
            f"{blind['NodeID'][:12]}), where workers may run: use an object store (--storage-path "
            f"s3://BUCKET/runs) or a shared filesystem (NFS) mounted at the same path on every node",
            ("cluster.storage_path",))


def run_logs_dir(cfg: ExperimentConfig) -> Optional[str]:
    """RUN_DIR/logs: the full console and Ray Train's log files (None for remote storage)."""
    storage = resolve_storage_path(cfg.cluster.storage_path)
    return None if is_uri(storage) else os.path.join(storage, cfg.cluster.name, "logs")


def _fit(trainer):
    """``trainer.fit()`` on a helper thread while the main thread waits. On the main thread Ray Train's driver
    installs its own SIGINT handler, which aborts the run and exits the process with status 1 itself, so
    fit() never raises and the command could not say what it kept; on any other thread (as under Tune) it
    installs none. Here a stop signal raises Stopped in the main thread (deeplab.cli) and `train` stops Ray."""
    outcome = {}

    def run():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e

    thread = threading.Thread(target=run, name="trainer.fit", daemon=True)
    thread.start()
    thread.join()  # a signal interrupts the wait: its handler raises here
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def stop_note(run_dir: str, rerun: str = "the same command") -> str:
    """What a stop keeps of the run in ``run_dir`` and what ``rerun`` does next: the ``interrupted (SIGINT): ...``
    line (cluster.checkpoints: a rerun resumes from the newest complete checkpoint)."""
    import pyarrow.fs

    from cluster.checkpoints import newest_complete, read_progress

    if is_uri(run_dir):
        return f"checkpoints kept in {run_dir}; {rerun} resumes from the newest complete one"
    found = newest_complete(pyarrow.fs.LocalFileSystem(), run_dir)
    reached = (read_progress(run_dir) or {}).get("reached_iteration")
    at = f" (the run had reached iteration {reached})" if reached else ""
    if found is None:
        return f"no checkpoint written yet{at}; {rerun} starts the run {run_dir} from the beginning"
    return f"checkpoint of iteration {found[1]} kept in {run_dir}{at}; {rerun} resumes from it"


def train(cfg: ExperimentConfig, *, callbacks: list = (), checked: bool = False, verbose: bool = False):
    """Run the experiment to the end (resuming a previous run of the same name) and write best.ckpt.
    ``callbacks``: extra Ray Train UserCallbacks (they run in the controller); ``checked``: the config already
    passed its checks and preflight; ``verbose``: Ray's own lines on the console too (they are always in the
    run dir's logs/ and Ray's session folder). A stop signal (Ctrl-C, SIGTERM) stops Ray and every process it
    started, says what was kept, and raises Stopped."""
    if not checked:
        cfg.check()
        preflight(cfg)
    storage = resolve_storage_path(cfg.cluster.storage_path)
    folder = run_folder(storage, cfg.cluster.name)
    try:
        pause_for_test("before-ray")
        init_ray(cfg, **ray_init_options(verbose))
        check_storage_visible(cfg, storage)  # before any training, not at the first checkpoint upload
        if folder.local and os.path.isdir(folder.path):
            print(f"run directory {folder.path} exists: resuming that run where it stopped", flush=True)
        if isinstance(cfg.cluster.num_workers, tuple):
            print(f"elastic: {cfg.cluster.min_workers} to {cfg.cluster.max_workers} workers; training starts once "
                  f"{cfg.cluster.min_workers} fit and grows as nodes join", flush=True)
        trainer = build_trainer(cfg, name=cfg.cluster.name, storage_path=storage, callbacks=callbacks,
                                verbose=verbose)
        with project_console(run_logs_dir(cfg), verbose):
            result = _fit(trainer)
    except KeyboardInterrupt:
        import ray

        ray.shutdown()  # the controller and the workers end with the driver's job; a local cluster with it
        on_interrupt(stop_note(folder.url))
        raise
    summary = _summary(result, folder, _copy_best(result, folder.child(BEST_FILE)))
    _write_summary(summary, folder)
    _print_summary(cfg, summary)
    return result


def preflight(cfg: ExperimentConfig) -> None:
    """Open the datasets and checkpoints once on the driver, so a bad path fails in one line here; remote
    weights (s3://...) are read as the workers will read them (pyarrow)."""
    from deeplab.checkpoint import load_checkpoint, read_weights_file
    from deeplab.data import build_dataset, dataset_for_model

    cfg = _absolute_paths(cfg)
    dataset_for_model(cfg.data, cfg.model.num_classes, f"model.num_classes={cfg.model.num_classes}")
    build_dataset(cfg.data, cfg.data.train_split, train=True)
    build_dataset(cfg.data, cfg.data.val_split, train=False)
    if cfg.train.init_from:
        load_checkpoint(cfg.train.init_from)
    elif cfg.train.pretrained_backbone and is_uri(cfg.train.pretrained_backbone):  # local: checked by config
        read_weights_file(cfg.train.pretrained_backbone)


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, aliases=ALIASES)
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's own lines on the console too (always in RUN_DIR/logs and Ray's session folder)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    preflight(cfg)

    import ray.train

    try:
        train(cfg, checked=True, verbose=args.verbose)
    except ray.train.TrainingFailedError as e:
        reason = divergence_reason(e) or training_code_reason(e) or error_line(e, limit=1000)
        where = run_logs_dir(cfg)
        print(f"error: training failed: {reason}" + (f" (tracebacks: {where}/console.log)" if where else ""),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
