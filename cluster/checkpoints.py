"""A run folder's checkpoints as they are on storage, whatever Ray's record of them says.

Ray Train lists a run's checkpoints in ``checkpoint_manager_snapshot.json``, which its driver writes after each
report. A driver stopped between a worker's upload and that write leaves a complete checkpoint Ray never
recorded, and resuming from Ray's record alone would train again every iteration since the previous one. So a
run resumes from the newest *complete* checkpoint in its folder: a ``checkpoint_<time>`` folder whose
``model.ckpt`` loads, the one with the highest iteration. Uploads to a local or NFS folder are atomic
(`upload_atomically`), as are single-object puts to S3/GCS, so a folder never holds half a ``model.ckpt``.

Also kept there (local/NFS storage): ``progress.json``, the iteration rank 0 last finished and the run's
restarts so far, so that a run resumed by a new driver (on a new Ray cluster) can say how many iterations it
does again.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from typing import Optional

import pyarrow.fs
import torch

from deeplab.checkpoint import CHECKPOINT_FILE
from deeplab.fileio import atomic_path
from deeplab.pause import pause_for_test

CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's folder names: checkpoint_<YYYY-mm-dd_HH-MM-SS.ffffff>
PROGRESS_FILE = "progress.json"


def _is_local(fs) -> bool:
    return isinstance(fs, pyarrow.fs.LocalFileSystem)


def checkpoint_folders(fs, run_path: str) -> list:
    """Names of the run's checkpoint folders, newest first (Ray names them by the time of the report)."""
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(run_path, allow_not_found=True))
    except OSError:
        return []
    names = [os.path.basename(i.path) for i in infos if i.type == pyarrow.fs.FileType.Directory]
    return sorted((n for n in names if n.startswith(CHECKPOINT_PREFIX)), reverse=True)


def checkpoint_iteration(fs, folder: str) -> Optional[int]:
    """The iteration saved in ``folder/model.ckpt``, or None when it is missing, partial or unreadable."""
    path = f"{folder}/{CHECKPOINT_FILE}"
    try:
        if _is_local(fs):
            payload = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with fs.open_input_file(path) as f:
                payload = torch.load(io.BytesIO(f.readall()), map_location="cpu", weights_only=True)
        return int(payload["state"]["iteration"])
    except Exception:  # torch's reader raises many types for a truncated or foreign file; pyarrow OSError
        return None


def newest_complete(fs, run_path: str, not_before: Optional[str] = None) -> Optional[tuple]:
    """(folder path, iteration) of the run's complete checkpoint with the highest iteration (the newer folder
    on a tie), or None. ``not_before``: a folder name known complete (Ray's recorded latest); older folders are
    not opened."""
    best = None
    for name in checkpoint_folders(fs, run_path):
        if not_before and name < not_before:
            break
        folder = f"{run_path}/{name}"
        iteration = checkpoint_iteration(fs, folder)
        if iteration is not None and (best is None or iteration > best[1]):
            best = (folder, iteration)
    return best


def upload_atomically(source_dir: str, folder: str, iteration: Optional[int] = None) -> str:
    """Copy ``source_dir/model.ckpt`` into ``folder`` (on a local or NFS filesystem) under a temporary name,
    then rename it: a stop at any moment leaves the whole file or none. ``iteration``: the checkpoint's, for
    the test-only pause."""
    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(folder, CHECKPOINT_FILE)) as tmp:
        shutil.copyfile(os.path.join(source_dir, CHECKPOINT_FILE), tmp)
        pause_for_test("checkpoint-write", iteration)
    pause_for_test("checkpoint-written", iteration)
    return folder


def remove_incomplete(fs, run_path: str) -> None:
    """Remove the checkpoint folders a stopped attempt left without a model.ckpt (its upload was cut short:
    at most a temporary file). Local storage only; called before the new attempt writes any."""
    if not _is_local(fs):
        return
    for name in checkpoint_folders(fs, run_path):
        folder = os.path.join(run_path, name)
        if not os.path.exists(os.path.join(folder, CHECKPOINT_FILE)):
            shutil.rmtree(folder, ignore_errors=True)


def write_progress(run_path: str, progress: dict) -> None:
    """Record how far the run got (rank 0, every iteration, local/NFS storage: a rename costs microseconds)."""
    path = os.path.join(run_path, PROGRESS_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(progress, f)
    os.replace(tmp, path)


def read_progress(run_path: str) -> Optional[dict]:
    try:
        with open(os.path.join(run_path, PROGRESS_FILE)) as f:
            progress = json.load(f)
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) else None
