"""What runs in each Ray Train worker: `deeplab.train_loop.train` with the Ray-specific pieces handed in.

Besides DDP with synchronized BatchNorm and checkpoints through Ray, a worker keeps elastic and preemptible runs
whole: rank 0 records how far it got (a resized group says how much it redoes), every rank checkpoints at once
on a preemption notice, and a SIGTERM (a node shutting down) lets a checkpoint upload in flight finish and
starts no other.
"""
from __future__ import annotations

import atexit
import copy
import functools
import json
import os
import threading
from contextlib import contextmanager
from typing import Optional

import pyarrow.fs
import torch

from cluster import ray_internals
from cluster.checkpoints import newest_complete, read_progress, remove_incomplete, upload_atomically, write_progress
from cluster.console import quiet_worker_console
from deeplab.checkpoint import CHECKPOINT_FILE, unwrap
from deeplab.config import experiment_from_dict


class ExitGuard:
    """Ray turns a worker's SIGTERM into sys.exit in the process's main thread: atexit handlers run, then the
    training thread is abandoned wherever it is. Writes done inside ``writing()`` are waited for at exit (up to
    ``grace_s``), and none starts once the process is exiting (the thread waits for the end instead of raising
    an error the run would take for a failure), so a shutdown never leaves half a checkpoint in storage."""

    def __init__(self, grace_s: float = 60.0):
        self.grace_s, self.exiting = grace_s, False
        self._lock = threading.Lock()
        atexit.register(self.wait)

    def wait(self) -> None:
        self.exiting = True
        if self._lock.acquire(timeout=self.grace_s):
            self._lock.release()

    @contextmanager
    def writing(self):
        self._lock.acquire()
        if self.exiting:  # never begin a write now; the process's exit ends this thread (no error to report)
            self._lock.release()
            threading.Event().wait()
        try:
            yield
        finally:
            self._lock.release()


def train_worker(config: dict) -> None:
    """One Ray Train worker: hand `deeplab.train_loop.train` the Ray-specific pieces."""
    import ray.train
    import ray.train.torch

    from cluster.syncbn import convert_sync_batchnorm, revert_sync_batchnorm
    from deeplab.train_loop import Worker, train

    cfg = experiment_from_dict(config["experiment"])
    if not config.get("verbose"):
        quiet_worker_console()
    exit_guard = ExitGuard()
    context = ray.train.get_context()
    world_size = context.get_world_size()
    device = ray.train.torch.get_device()

    synchronized = world_size > 1 and not cfg.train.freeze_bn  # frozen BN uses running stats: nothing to sync

    set_worker_threads(cfg.cluster.cpus_per_worker)

    def prepare_model(model):
        if synchronized:
            model = convert_sync_batchnorm(model, device.type)
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_options(cfg.cluster))
        return compress_gradients(model, cfg.cluster.grad_compression)

    def plain_model(model):  # a copy: reverting in place would swap the training model's modules
        return revert_sync_batchnorm(copy.deepcopy(unwrap(model)))

    storage = context.get_storage()
    fs, run_path = storage.storage_filesystem, storage.experiment_fs_path
    local = isinstance(fs, pyarrow.fs.LocalFileSystem)

    def report(metrics: dict, checkpoint_dir: Optional[str]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # local/NFS storage: the whole model.ckpt or none (Ray's own copy writes it in place)
        upload = functools.partial(_upload, run_path, iteration=metrics["iteration"]) if local and checkpoint else None
        with exit_guard.writing():  # a checkpoint upload is finished, or not begun, when the node shuts down
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=upload)

    def latest_checkpoint() -> Optional[str]:
        return _newest_checkpoint(fs, run_path, context.get_world_rank())

    record_progress, recorded_progress = _progress_store(config["run_key"], fs, run_path)
    train(cfg, Worker(rank=context.get_world_rank(), world_size=world_size, device=device,
                      prepare_model=prepare_model, plain_model=plain_model, report=report,
                      latest_checkpoint=latest_checkpoint, log_dir=config.get("log_dir"), synchronized_bn=synchronized,
                      record_progress=record_progress, recorded_progress=recorded_progress,
                      preempted=_preemption_notice()))


def _upload(run_path: str, checkpoint, dir_name: str, iteration: int):
    """Ray's checkpoint_upload_fn for local/NFS storage: `cluster.checkpoints.upload_atomically`."""
    import ray.train

    return ray.train.Checkpoint(upload_atomically(checkpoint.path, f"{run_path}/{dir_name}", iteration))


def _newest_checkpoint(fs, run_path: str, rank: int) -> Optional[str]:
    """model.ckpt of the newest complete checkpoint in the run folder: Ray's latest, or a newer one Ray never
    recorded (its driver was stopped just after the upload; see cluster.checkpoints). Rank 0 first removes what
    a stopped attempt's upload left (no rank writes there now)."""
    import ray.train

    if rank == 0:
        remove_incomplete(fs, run_path)
    recorded = ray.train.get_checkpoint()
    found = newest_complete(fs, run_path, os.path.basename(recorded.path) if recorded else None)
    if found is None and recorded is None:
        return None
    checkpoint = ray.train.Checkpoint(found[0], fs) if found else recorded
    folder = checkpoint.path if isinstance(fs, pyarrow.fs.LocalFileSystem) else checkpoint.to_directory()  # S3/GCS
    return os.path.join(folder, CHECKPOINT_FILE)


def set_worker_threads(cpus: float) -> None:
    """One intra-op thread per CPU the worker holds, one inter-op thread: more threads than reserved cores
    make OpenMP's spin-waits and gloo's own threads fight over the same cores."""

    torch.set_num_threads(max(1, int(cpus)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # the inter-op pool already started in this process: it stays as it is
        pass


def ddp_options(cluster) -> dict:
    """DDP's arguments: buckets of cluster.ddp_bucket_mb, gradients stored in the buckets themselves (no copy
    of every gradient into a bucket and back before each all-reduce)."""
    return {"bucket_cap_mb": cluster.ddp_bucket_mb, "gradient_as_bucket_view": True}


def compress_gradients(model, compression: str):
    """cluster.grad_compression=bf16: DDP all-reduces bf16 copies of the gradients (half the bytes; the
    averaged gradient is rounded to bf16, so training is no longer exactly the single-process one)."""
    from torch.nn.parallel import DistributedDataParallel

    if compression == "bf16" and isinstance(model, DistributedDataParallel):
        model.register_comm_hook(None, _bf16_all_reduce)
    return model


def _bf16_all_reduce(group, bucket):
    """DDP communication hook: the bucket's mean over workers, sent as bf16. torch's own bf16_compress_hook
    refuses gloo (it asks for NCCL or XCCL); gloo sums bf16 as well."""
    import torch.distributed as dist

    group = group or dist.group.WORLD
    compressed = bucket.buffer().to(torch.bfloat16).div_(dist.get_world_size(group))
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(done):
        buffer = bucket.buffer()
        buffer.copy_(done.value()[0])
        return buffer

    return future.then(decompress)


def _progress_store(run_key: str, fs, run_path: str) -> tuple:
    """(record, read) of how far a run's rank 0 got (deeplab.train_loop.Worker.record_progress), so that the group
    that resumes after a resize or a stop can say how much work it redoes: in the run folder on local/NFS storage
    (cluster.checkpoints.PROGRESS_FILE; it outlives the cluster), else in Ray's key-value store (the GCS; it lives
    as long as the cluster; cluster.ray_internals.kv_put)."""
    key = f"deeplab/progress/{run_key}"
    local = isinstance(fs, pyarrow.fs.LocalFileSystem)

    def record(progress: dict) -> None:
        if local:
            write_progress(run_path, progress)
        else:
            ray_internals.kv_put(key, json.dumps(progress))

    def read() -> Optional[dict]:
        if local:
            return read_progress(run_path)
        value = ray_internals.kv_get(key)
        return json.loads(value) if value else None

    return record, read


def _preemption_notice():
    """True once per new preemption notice (Ray drains a node being preempted: a spot reclaim). It is a barrier:
    every rank calls it at the same iterations, and Ray gives them all the same answer."""
    import ray.train

    seen: set = set()

    def preempted() -> bool:
        info = ray.train.get_preemption_info()
        new = set(info.preempted_node_ids) - seen if info is not None else set()
        seen.update(new)
        return bool(new)

    return preempted
