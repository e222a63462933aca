"""One self-describing checkpoint format for every stage: model config, weights, optional training state.

A file is a ``torch.save`` of plain containers and tensors only, so ``torch.load(weights_only=True)`` reads
it without unpickling code. The model is rebuilt from the config in the file alone; that config records the
atrous layout the weights were trained with (``model.atrous_layout``), and a file from before a field existed
is read as the code that wrote it ran (`_as_written`), so no checkpoint changes its outputs.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import torch

from .cli import UserError, error_line
from .config import ConfigError, ExperimentConfig, ModelConfig, experiment_from_dict, model_config_from_dict, to_plain
from .fileio import atomic_path, ensure_dir, is_uri
from .model import build_model

FORMAT = "deeplabv3-checkpoint"
VERSION = 1
CHECKPOINT_FILE = "model.ckpt"  # the file in every checkpoint folder a training run reports


class CheckpointError(UserError, ValueError):
    """A file that cannot be used as a checkpoint; the message is one line naming the file."""


@dataclass
class Checkpoint:
    model: torch.nn.Module
    config: ModelConfig
    state: dict = field(default_factory=dict)
    experiment: Optional[ExperimentConfig] = None
    path: Optional[str] = None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _check_plain(value, where: str) -> None:
    """Only what a weights-only load accepts; fail at save time, not when someone loads the file."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint state {where}: key {k!r} is {type(k).__name__}, not str/int")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.Size))):
        raise TypeError(f"checkpoint state {where}: {type(value).__name__} cannot be loaded weights-only; "
                        "store tensors, numbers, strings, lists or dicts")


def save_checkpoint(path, model: torch.nn.Module, cfg, **state) -> Path:
    """Write ``model``'s weights with its config (ModelConfig, or ExperimentConfig whose .model is used).

    ``state`` holds training state (iteration, optimizer, scheduler, metrics, rng, ...). Atomic: a temporary
    file in the same folder is renamed over ``path``, so a reader never sees half a checkpoint.
    """
    path = Path(path)
    experiment = cfg if isinstance(cfg, ExperimentConfig) else None
    model_cfg = experiment.model if experiment else cfg
    if not isinstance(model_cfg, ModelConfig):
        raise TypeError(f"save_checkpoint: cfg must be a ModelConfig or ExperimentConfig, got {type(cfg).__name__}")
    net = unwrap(model)
    if getattr(net, "config", None) is not None:  # the model's own stride/rates win over a stale config
        model_cfg = net.config
        if experiment is not None:
            experiment = experiment.replace(model=model_cfg)
    state = to_plain(state)
    _check_plain(state, "state")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": to_plain(model_cfg),
        "experiment": to_plain(experiment) if experiment else None,
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "state": state,
    }
    ensure_dir(path.parent)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object keeps a full disk's errno
        torch.save(payload, f)
    return path


def remote_filesystem(uri: str) -> tuple:
    """(pyarrow filesystem, path on it), as Ray Train resolves its storage_path: pyarrow's own (s3, gs, hdfs,
    file), else an fsspec one (abfs, memory, ...) wrapped for pyarrow."""
    import pyarrow
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(_delayed_open(uri))
    except pyarrow.ArrowInvalid:
        import fsspec

        fs, where = fsspec.core.url_to_fs(uri)
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), where


def _delayed_open(uri: str) -> str:
    """s3:// URIs open with ``allow_delayed_open``: a small file (a summary, a mask) is then one PUT when it is
    closed instead of a three-request multipart upload, and nothing is started for a write that never closes.
    (moto's server answers multipart completions with bodies pyarrow sometimes takes for embedded errors.)"""

    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if parts.scheme != "s3" or any(k == "allow_delayed_open" for k, _ in query):
        return uri
    return urlunsplit(parts._replace(query=urlencode(query + [("allow_delayed_open", "true")])))


def read_remote(uri: str):
    """An object-store file (s3://, gs://, file://...) read whole through pyarrow's filesystems, the layer the
    cluster reads remote images and run storage with; pyarrow is imported only for such a path."""

    import pyarrow.fs

    try:
        fs, where = remote_filesystem(uri)
        info = fs.get_file_info(where)
        if info.type == pyarrow.fs.FileType.NotFound:
            raise CheckpointError(f"{uri}: no such file")
        if info.type == pyarrow.fs.FileType.Directory:
            raise CheckpointError(f"{uri}: is a folder, not a weights file")
        with fs.open_input_file(where) as f:
            data = f.readall()
    except CheckpointError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for bad URIs, credentials, unreachable stores
        raise CheckpointError(f"{uri}: cannot read ({error_line(e, 160)})") from None
    if not data:
        raise CheckpointError(f"{uri}: empty file")
    return io.BytesIO(data)


def read_weights_file(path, map_location="cpu", data: Optional[bytes] = None) -> dict:
    """``torch.load(weights_only=True)`` with every failure turned into a one-line CheckpointError. A URI
    (s3://bucket/best.ckpt) is read through pyarrow. ``data``: the file's bytes where the caller read them already
    (errors still name ``path``)."""
    if data is not None:
        source = io.BytesIO(data)
        if not data:
            raise CheckpointError(f"{path}: empty file")
    elif is_uri(path):
        path = source = str(path)
        source = read_remote(path)
    else:
        path = source = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file")
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = ""
        for line in str(e).splitlines():
            if "GLOBAL" in line or "Unsupported" in line:
                detail = ": " + line.strip()[:160]
                break
        raise CheckpointError(f"{path}: refused, it holds pickled objects a weights-only load does not allow "
                              f"(it could run code){detail or ': ' + error_line(e, 160)}") from None
    except Exception as e:  # torch's reader raises many types for a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a torch file: "
                              f"{error_line(e, 160)})") from None


def _saved_configs(payload: dict) -> tuple:
    """(ModelConfig, ExperimentConfig or None) as saved, read as the code that wrote the file ran them."""
    model = _as_written(payload["model_config"])
    experiment = payload.get("experiment")
    if experiment:
        experiment = {**experiment, "model": _as_written(experiment.get("model") or {})}
    return model_config_from_dict(model), experiment_from_dict(experiment) if experiment else None


def _as_written(model: dict) -> dict:
    """A saved model config with what files from before a field existed meant: no aligned corners (before
    model.align_corners), the atrous layout they were trained with (before model.atrous_layout: torchvision's
    for head torchvision, else the legacy rule, so their outputs at every stride stay as they were), and
    without model.aux_head (the auxiliary head was removed: it was never trained)."""
    model = {k: v for k, v in model.items() if k != "aux_head"}
    layout = "torchvision" if model.get("head") == "torchvision" else "legacy"
    return {"align_corners": False, "atrous_layout": layout, **model}


def _without_aux_head(weights: dict) -> dict:
    """Weights less torchvision's auxiliary head, which files from before its removal may hold."""
    return {k: v for k, v in weights.items() if not k.startswith("aux_classifier.")}


def load_checkpoint(path, map_location="cpu", data: Optional[bytes] = None) -> Checkpoint:
    """Rebuild the model from the file alone and load its weights; never unpickles code. ``data``: the file's
    bytes where the caller read them already."""
    payload = read_weights_file(path, map_location, data)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = ""
        if isinstance(payload, dict) and any(isinstance(k, str) and k.startswith(("conv1.", "features.", "backbone."))
                                             for k in payload):
            hint = (" (a torchvision weights file? convert it with: "
                    "python -m deeplab.import_torchvision FILE -o model.ckpt)")
        raise CheckpointError(f"{path}: not a DeepLabv3 checkpoint{hint}")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {payload['version']} is newer than this code "
                              f"reads ({VERSION}); upgrade the project")
    try:
        cfg, experiment = _saved_configs(payload)
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid model config in checkpoint ({e})") from None
    model = build_model(cfg)
    weights = payload.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: checkpoint has no weights")
    weights = _without_aux_head(weights)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    mismatched = [k for k in own.keys() & weights.keys() if tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or unexpected or mismatched:
        parts = [f"{len(missing)} missing" if missing else "", f"{len(unexpected)} unexpected" if unexpected else "",
                 f"{len(mismatched)} with other shapes" if mismatched else ""]
        example = (missing or unexpected or mismatched)[0]
        raise CheckpointError(f"{path}: weights were written for another architecture than its config "
                              f"({cfg.backbone}, head={cfg.head}): {', '.join(p for p in parts if p)} keys, "
                              f"e.g. {example}")
    model.load_state_dict(weights)
    model.eval()
    return Checkpoint(model=model, config=cfg, state=payload.get("state") or {}, experiment=experiment,
                      path=str(path))
