"""What `cluster.segment` and `cluster.serve` share: a model's files shipped to every node through Ray's object
store (workers need no shared filesystem or copy of their own) into a cache keyed by their content hash, and
batches of same-size images.

Images are never resized or padded to share a batch: padding changes what the model sees near the border
(and what image pooling averages), so predictions would differ from `deeplab.predict` on the same image.
Images of one size run as one batch; the rest wait for their own size's turn.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence
from urllib.parse import urlsplit

import numpy as np

from deeplab.config import Alias
from deeplab.data.imagenet import normalize_array
from deeplab.fileio import atomic_path, ensure_dir, is_uri
from export.metadata import file_sha256
from export.model_file import ModelHandle, formats_help, load_runner, model_files

CACHE_ENV = "DEEPLAB_MODEL_CACHE"  # where nodes keep shipped models (default: TMPDIR/deeplab-models)


def model_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The parser of a command that runs any model file (segment, serve): the module docstring's body as its
    description, and the MODEL argument."""

    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help=formats_help())
    return p


# segment's and serve's --output-stride: only a checkpoint can change its stride (an exported graph has its own)
CHECKPOINT_STRIDE_ALIAS = Alias("--output-stride", "inference.output_stride",
                                "checkpoints only: run at this output stride (default: the checkpoint's)")


def model_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "deeplab-models")


def fetch_model(model: str) -> str:
    """MODEL as a local path. An object-store URL of a one-file model (``s3://.../best.ckpt`` as cluster.train
    prints it, a single-file ONNX) is downloaded into the model cache, whole or not at all, afresh each time;
    a local path is returned as given."""
    if not is_uri(model):
        return model
    from deeplab.checkpoint import read_remote  # one-line errors naming the URL

    data = read_remote(model).getvalue()
    target = model_cache() / "fetched" / hashlib.sha256(model.encode()).hexdigest()[:16]
    target = ensure_dir(target) / (PurePosixPath(urlsplit(model).path).name or "model")
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return str(target)


def _identity(name: str, files: dict) -> dict:
    """``files``: name -> sha256, the main file first. The model's sha256 is over the files' hashes in that
    order, not their names: a renamed copy is the same model."""
    digest = hashlib.sha256("".join(f"{sha}\n" for sha in files.values()).encode()).hexdigest()
    return {"name": name, "sha256": digest, "files": files}


def model_identity(model) -> dict:
    """What a model is, by content: every file of it (export.model_file.model_files) with its sha256, and one
    sha256 over them all. Two copies of a model in different folders are the same model. ``model``: a path, or
    export.model_file.open_model_file's handle (its hashes, taken when it was read: no file is read again)."""

    if isinstance(model, ModelHandle):
        return _identity(model.path.name, dict(model.sha256))
    return _identity(Path(model).name, {f.name: file_sha256(f) for f in model_files(model)})


def ship_model(model) -> dict:
    """Put every file of a model (an IR's .bin, an engine's sidecar) in Ray's object store once; workers on any
    node open it with `open_model`, with no shared filesystem. The driver that calls this must stay alive while
    workers start (it owns the objects). ``model``: a path, or open_model_file's handle (its bytes as read)."""
    import ray

    if isinstance(model, ModelHandle):
        name, data = model.path.name, model.data
    else:
        name, data = Path(model).name, {f.name: f.read_bytes() for f in model_files(model)}
    shipped = _identity(name, {file: hashlib.sha256(d).hexdigest() for file, d in data.items()})
    shipped["refs"] = {file: ray.put(d) for file, d in data.items()}
    return shipped


def _cached_ok(target: Path, sha256: str) -> bool:
    return target.is_file() and file_sha256(target) == sha256


def _materialize(shipped: dict, fetch=None) -> Path:
    """The shipped files under <model cache>/<content hash>/ on this node. A file already there is used only if
    its sha256 is the shipped one; a missing, cut-short or changed file is (re)written atomically.
    ``fetch(name) -> bytes``: how a file's bytes are got (default: ray.get of its object)."""
    if fetch is None:
        import ray

        def fetch(name):
            return ray.get(shipped["refs"][name])
    folder = model_cache() / shipped["sha256"][:32]
    folder.mkdir(parents=True, exist_ok=True)
    for name, sha256 in shipped["files"].items():
        target = folder / name
        if _cached_ok(target, sha256):
            continue
        data = fetch(name)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RuntimeError(f"{name}: the shipped bytes do not have the sha256 the driver computed")
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return folder / shipped["name"]


def open_model(shipped, **kwargs):
    """A `export.model_file.ModelRunner` for a model given as a path or as `ship_model`'s handle."""

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

    out: list = [None] * len(images)
    for indices in model_calls([image.shape for image in images], max_batch_pixels):
        batch = np.stack([normalize_array(images[i]) for i in indices])
        try:
            labels = list(runner.labels(batch))
        except Exception as e:
            if not keep_errors:
                raise
            labels = [e] * len(indices)
        for i, one in zip(indices, labels):
            out[i] = one
    return out


def class_pixels(labels: np.ndarray, class_names: Sequence[str]) -> dict:
    """{class name: pixel count} for the classes present, most pixels first."""
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    order = np.argsort(-counts, kind="stable")
    return {(class_names[k] if k < len(class_names) else f"class_{k}"): int(counts[k]) for k in order if counts[k]}


def worker_device(num_gpus: float, device: Optional[str] = None) -> str:
    """cuda when the worker holds a GPU (Ray shows it only those), else cpu."""
    return device or ("cuda" if num_gpus and num_gpus > 0 else "cpu")


def set_threads(cpus: float) -> int:
    """One intra-op thread per CPU the worker holds, so actors on one node do not oversubscribe it: pass it to
    `open_model`. torch's pool is set here only where torch is loaded already (a checkpoint's runner sets it
    when it loads torch), so an exported model's worker never imports torch for it."""
    threads = max(1, int(cpus))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads
