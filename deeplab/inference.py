"""Inference as the paper evaluates (Section 4, Tables 4 and 6): a chosen output stride, multi-scale inputs
and left-right flips with softmax probabilities averaged, and sliding windows for images larger than a
limit (Cityscapes is 1024x2048).

``predict_logits`` returns scores whose softmax is the averaged probability; ``argmax(1)`` is the label map.
``evaluate(predict, batches, num_classes)`` is the one evaluator, for any backend: ``model_predictor(model, ...)``
makes ``predict`` for a torch model (the training loop, the evaluate command, the demo); export's runners are
others.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import PAPER_SCALES  # noqa: F401  (the one list: --multi-scale sets inference.scales to it)
from .metrics import ConfusionMatrix


@contextmanager
def output_stride_as(model, output_stride: Optional[int]):
    """Run at ``output_stride`` (same weights), then put the model's own stride back."""
    net = getattr(model, "module", model)
    previous = getattr(net, "output_stride", None)
    if output_stride is None or previous == output_stride:
        yield model
        return
    if not hasattr(net, "set_output_stride"):
        raise ValueError(f"{type(net).__name__} cannot change its output stride")
    net.set_output_stride(output_stride)
    try:
        yield model
    finally:
        net.set_output_stride(previous)


def align_corners(model) -> bool:
    """How the model resizes (model.align_corners): the multi-scale resizes follow it. False for models
    without a config (torchvision's convention)."""
    net = getattr(model, "module", model)
    return bool(getattr(getattr(net, "config", None), "align_corners", False))


def scaled_size(size: int, scale: float) -> int:
    """(size - 1) * scale + 1: keeps 513 = 16k + 1 sizes on the same grid (513 -> 257, 385, 641, ...)."""
    return max(1, int(round((size - 1) * scale)) + 1)


def _windows(length: int, window: int, stride: int) -> list:
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def _forward(model, images: torch.Tensor, window) -> torch.Tensor:
    """Softmax probabilities at the input size; tiles with 1/3 overlap when the input exceeds ``window``."""
    n, _, h, w = images.shape
    if window is None or (h <= window[0] and w <= window[1]):
        return model(images).float().softmax(1)
    wh, ww = min(window[0], h), min(window[1], w)
    probs = None
    counts = torch.zeros(1, 1, h, w, device=images.device)
    for top in _windows(h, wh, max(1, math.ceil(wh * 2 / 3))):
        for left in _windows(w, ww, max(1, math.ceil(ww * 2 / 3))):
            p = model(images[:, :, top:top + wh, left:left + ww]).float().softmax(1)
            if probs is None:
                probs = torch.zeros(n, p.shape[1], h, w, device=images.device)
            probs[:, :, top:top + wh, left:left + ww] += p
            counts[:, :, top:top + wh, left:left + ww] += 1
    return probs / counts


@torch.no_grad()
def predict_logits(model, images: torch.Tensor, output_stride: Optional[int] = None,
                   scales: Sequence[float] = (1.0,), flip: bool = False, window=None) -> torch.Tensor:
    """Class scores (N, C, H, W) for a batch of normalized images.

    One scale, no flip, no window: the model's logits. Otherwise the log of the softmax probabilities
    averaged over every scale, flip and window (the paper's multi-scale + flip inference), so softmax of the
    result is that average and argmax is the prediction. ``window`` (int or (h, w)): images larger than
    it are tiled with overlapping windows. The model's train/eval mode is left as the caller set it.
    """
    if isinstance(window, int):
        window = (window, window)
    scales = tuple(float(s) for s in scales) or (1.0,)
    h, w = images.shape[-2:]
    corners = align_corners(model)
    with output_stride_as(model, output_stride):
        if scales == (1.0,) and not flip and (window is None or (h <= window[0] and w <= window[1])):
            return model(images).float()
        total = None
        for s in scales:
            x = images
            if s != 1.0:
                x = F.interpolate(images, size=(scaled_size(h, s), scaled_size(w, s)), mode="bilinear",
                                  align_corners=corners)
            for flipped in ((False, True) if flip else (False,)):
                xi = x.flip(-1) if flipped else x
                p = _forward(model, xi, window)
                if flipped:
                    p = p.flip(-1)
                if p.shape[-2:] != (h, w):
                    p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=corners)
                total = p if total is None else total + p
        count = len(scales) * (2 if flip else 1)
        return (total / count).clamp_min(1e-12).log()


@contextmanager
def eval_mode(model):
    """Every module in eval mode inside the block; afterwards each module back in the mode it had, so a
    frozen BatchNorm in a training model stays frozen (``model.train(was_training)`` would unfreeze it)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def _memory_format(model) -> torch.memory_format:
    """channels_last when the model's first convolution weight is stored so (inputs follow the weights)."""
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    if weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def model_predictor(model, output_stride: Optional[int] = None, scales: Sequence[float] = (1.0,), flip: bool = False,
                    window=None, device=None, amp: Optional[torch.dtype] = None) -> Callable:
    """``predict(images (N,3,H,W)) -> logits (N,C,H,W)`` for a torch model, as `evaluate` takes it: images moved
    to the model's device and memory format, the model in eval mode for the call (each module's mode restored
    after it), under autocast to ``amp`` when given, with `predict_logits`'s stride, scales, flips and windows."""
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    memory_format = _memory_format(model)

    def predict(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        with eval_mode(model), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return predict_logits(model, images, output_stride, scales, flip, window)

    return predict


def evaluate(predict: Callable, batches: Iterable, num_classes: int, ignore_index: int = 255,
             progress: Optional[Callable[[int], None]] = None) -> ConfusionMatrix:
    """The one evaluator: the confusion matrix of ``predict`` over ``batches`` of ``(images, masks)``.

    ``predict(images (N,3,H,W) tensor) -> logits (N,C,H,W)`` at the image size, a torch tensor or a numpy array
    (any backend: `model_predictor` for torch models, an ONNX / OpenVINO / TensorRT runner). ``progress`` is
    called with the number of images after each batch. No all-reduce: in distributed evaluation each worker
    evaluates its shard, then calls ``cm.all_reduce()``.
    """
    cm = ConfusionMatrix(num_classes, ignore_index)
    for images, masks in batches:
        logits = predict(images)
        if isinstance(logits, np.ndarray):
            logits = torch.from_numpy(logits)
        cm.update(logits.argmax(1).cpu(), masks)
        if progress is not None:
            progress(len(images))
    return cm
