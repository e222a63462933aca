"""What `cluster.segment` and `cluster.serve` share: a model file shipped to every node through Ray's object
store (workers need no shared filesystem or copy of their own), and batches of same-size images.

Images are never resized or padded to share a batch: padding changes what the model sees near the border
(and what image pooling averages), so predictions would differ from `deeplab.predict` on the same image.
Images of one size run as one batch; the rest wait for their own size's turn.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

MODEL_CACHE = Path(tempfile.gettempdir()) / "deeplab-models"


def model_files(path) -> list:
    """The files that make up a model: the file itself, and an engine's sidecar."""
    from export.runtime import ENGINE_SUFFIXES, sidecar_path

    path = Path(path)
    files = [path]
    if path.suffix.lower() in ENGINE_SUFFIXES or sidecar_path(path).is_file():
        files.append(sidecar_path(path))
    return files


def ship_model(path) -> dict:
    """Put a model file (and its sidecar) in Ray's object store once; workers on any node open it with
    `open_model`. The driver that calls this must stay alive while workers start (it owns the objects)."""
    import ray

    digest = hashlib.sha256()
    refs = {}
    for f in model_files(path):
        data = f.read_bytes()
        digest.update(f.name.encode() + b"\0" + data)
        refs[f.name] = ray.put(data)
    return {"name": Path(path).name, "sha256": digest.hexdigest(), "files": refs}


def _materialize(shipped: dict) -> Path:
    """The shipped files under MODEL_CACHE/<hash>/ on this node (written once per node, atomically)."""
    import ray

    folder = MODEL_CACHE / shipped["sha256"][:24]
    folder.mkdir(parents=True, exist_ok=True)
    for name, ref in shipped["files"].items():
        target = folder / name
        if target.is_file():
            continue
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        try:
            tmp.write_bytes(ray.get(ref))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return folder / shipped["name"]


def open_model(shipped, **kwargs):
    """A `export.runtime.ModelRunner` for a model given as a path or as `ship_model`'s handle."""
    from export.runtime import load_runner

    path = _materialize(shipped) if isinstance(shipped, dict) else shipped
    return load_runner(path, **kwargs)


def model_calls(shapes: Sequence[tuple], max_batch_pixels: Optional[int] = None) -> list:
    """Which images share a model call: same-size images only (never resized), at most ``max_batch_pixels``
    pixels per call (the memory a call needs grows with its pixels); an image over the budget runs alone."""
    by_size = defaultdict(list)
    for i, shape in enumerate(shapes):
        by_size[tuple(shape[:2])].append(i)
    calls = []
    for (height, width), indices in by_size.items():
        per_call = max(1, (max_batch_pixels or len(indices) * height * width) // max(1, height * width))
        calls += [indices[k:k + per_call] for k in range(0, len(indices), per_call)]
    return calls


def predict_labels(runner, images: Sequence[np.ndarray], keep_errors: bool = False,
                   max_batch_pixels: Optional[int] = None) -> list:
    """Label maps (HxW uint8) for HxWx3 uint8 images, each at its own size; one model call per size and per
    ``max_batch_pixels`` (see model_calls). ``keep_errors``: a call the model fails on (an engine profile too
    small, out of GPU memory) gets the exception in place of its label maps, and the other calls still run."""
    from deeplab.data import normalize

    out: list = [None] * len(images)
    for indices in model_calls([image.shape for image in images], max_batch_pixels):
        batch = np.stack([normalize(images[i]).numpy() for i in indices])
        try:
            labels = list(runner.labels(batch))
        except Exception as e:
            if not keep_errors:
                raise
            labels = [e] * len(indices)
        for i, one in zip(indices, labels):
            out[i] = one
    return out


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def class_pixels(labels: np.ndarray, class_names: Sequence[str]) -> dict:
    """{class name: pixel count} for the classes present, most pixels first."""
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    order = np.argsort(-counts, kind="stable")
    return {(class_names[k] if k < len(class_names) else f"class_{k}"): int(counts[k]) for k in order if counts[k]}


def worker_device(num_gpus: float, device: Optional[str] = None) -> str:
    """cuda when the worker holds a GPU (Ray shows it only those), else cpu."""
    return device or ("cuda" if num_gpus and num_gpus > 0 else "cpu")


def set_threads(cpus: float) -> int:
    """One intra-op thread per CPU the worker holds, so actors on one node do not oversubscribe it."""
    import torch

    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    return threads
