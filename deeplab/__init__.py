"""DeepLabv3 as in the paper: model, config, checkpoints, data, metrics, inference.

Nothing here imports Ray or ONNX. Public names are loaded on first use so `--help` stays fast.
"""
import importlib

from .config import ConfigError, ExperimentConfig, ModelConfig, load_config

_LAZY = {
    "build_model": ".model",
    "DeepLabV3": ".model",
    "save_checkpoint": ".checkpoint",
    "load_checkpoint": ".checkpoint",
    "CheckpointError": ".checkpoint",
    "ConfusionMatrix": ".metrics",
}

__all__ = ["ConfigError", "ExperimentConfig", "ModelConfig", "load_config", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'deeplab' has no attribute {name!r}")
