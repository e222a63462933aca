"""One worker's training loop: the paper's protocol (Section 4.1), from data to saved checkpoint.

The loop knows nothing of Ray. Whoever runs it hands in a `Worker`: rank, world size, device, how to wrap the
model (SyncBN + DDP under Ray), how to report metrics with a checkpoint and where the last checkpoint is.
`Worker()` with its defaults is a plain single process (tests, `cluster.bench`).

Protocol: SGD (momentum, weight decay), poly learning rate (1 - it/max_it)^power set every iteration,
cross-entropy on logits at label size with 255 ignored, global batch `train.batch_size` split across the
workers. Every `train.eval_interval` iterations and at the end all workers evaluate their shard of the
validation set, all-reduce the confusion matrix, and call `report` once; rank 0 attaches a directory
holding `model.ckpt` (model with plain BN, experiment config, iteration, optimizer, metrics, RNG states).
Resuming from such a checkpoint restores weights, optimizer, iteration, sampler position and RNG states.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset

from .checkpoint import load_checkpoint, save_checkpoint, unwrap
from .config import ConfigError, ExperimentConfig

CHECKPOINT_FILE = "model.ckpt"


@dataclass
class Worker:
    """What the loop needs from whoever runs it. The defaults are one plain process on the CPU."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prepare_model: Callable[[nn.Module], nn.Module] = lambda model: model  # Ray: SyncBN, then DDP
    plain_model: Callable[[nn.Module], nn.Module] = unwrap  # the model as saved: no DDP, plain BatchNorm2d
    report: Callable[[dict, Optional[str]], None] = lambda metrics, checkpoint_dir: None  # rank 0 passes a dir
    latest_checkpoint: Callable[[], Optional[str]] = lambda: None  # a model.ckpt to resume from
    log_dir: Optional[str] = None  # TensorBoard event files (rank 0)


# ---------------------------------------------------------------------------------------------------------
# Pieces of the protocol, small enough to test alone


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float = 0.9) -> float:
    """The paper's "poly" policy: base_lr * (1 - iteration / max_iterations) ** power."""
    return base_lr * (1 - iteration / max_iterations) ** power


def split_batch(global_batch: int, world_size: int, rank: int) -> int:
    """Rank's share of the global batch: every world_size-th image of it, so shares differ by one at most
    (8 over 3 workers: 3, 3, 2). Synchronized BatchNorm sees the global batch whatever the shares."""
    return len(range(rank, global_batch, world_size))


def per_worker_batch(batch_size: int, world_size: int) -> int:
    """The smallest share of the global batch over ``world_size`` workers; a share of 1 cannot train BatchNorm."""
    per_worker = split_batch(batch_size, world_size, world_size - 1)
    if per_worker < 2:
        raise ConfigError(f"train.batch_size={batch_size} over {world_size} workers is {per_worker} image per "
                          "worker; BatchNorm (the image-pooling branch) needs at least 2: raise train.batch_size "
                          "or use fewer workers")
    return per_worker


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """train.amp -> autocast dtype (None: full precision). auto: bf16 on CUDA (fp16 on GPUs without bf16)
    and on CPUs with native bf16 (AVX512-BF16 / AMX), else off."""
    if amp is False or amp == "off":  # YAML reads a bare `off` as false
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs a CUDA device; use bf16, auto or off on CPU")
        return torch.float16
    if amp != "auto":
        raise ConfigError(f"train.amp={amp!r} is unknown; allowed: auto, bf16, fp16, off")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
            getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if native else None
    return None


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """model.train(), except frozen BatchNorm keeps its running statistics (stage 2)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


class GlobalBatchSampler(Sampler):
    """This rank's share of each global batch. Epoch e's order is one permutation drawn from (seed, e), cut into
    global batches (a last partial one is dropped); rank r of W takes every W-th image of each. So the batches
    an epoch is made of do not depend on the number of workers, and a run resized mid-epoch resumes at the same
    global batch and sees each image of the epoch once. ``start``: global batches of this epoch already done.
    When W divides the batch and the dataset, each rank gets what DistributedSampler(shuffle=True, seed) gives it."""

    def __init__(self, size: int, global_batch: int, world_size: int, rank: int, seed: int):
        self.size, self.global_batch, self.world_size, self.rank, self.seed = size, global_batch, world_size, rank, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        for step in range(self.start, self.steps_per_epoch):
            yield order[step * self.global_batch:(step + 1) * self.global_batch][self.rank::self.world_size]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start


def _rng_state() -> dict:
    """This process's RNG states as plain containers (a weights-only checkpoint holds them)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                        has_gauss, cached], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _gather_rng(worker: Worker) -> list:
    """Every rank's RNG state, on every rank (rank 0 saves them; each rank restores its own)."""
    state = _rng_state()
    if worker.world_size == 1 or not _distributed():
        return [state]
    states = [None] * worker.world_size
    dist.all_gather_object(states, state)
    return states


def _mean_across(value: torch.Tensor, worker: Worker) -> torch.Tensor:
    if worker.world_size > 1 and _distributed():
        value = value.clone()
        dist.all_reduce(value)
        value /= worker.world_size
    return value


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


# ---------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_shard(model: nn.Module, dataset, num_classes: int, worker: Worker, amp: Optional[torch.dtype],
                   channels_last: bool = True, ignore_index: int = 255):
    """This rank's share of the validation set (every world_size-th image), all-reduced: the confusion
    matrix of the whole set on every rank. Runs the bare module: no DDP collectives in eval."""
    from .metrics import ConfusionMatrix

    net = unwrap(model)
    was_training = net.training
    net.eval()
    shard = Subset(dataset, range(worker.rank, len(dataset), worker.world_size))
    loader = DataLoader(shard, batch_size=1, shuffle=False, num_workers=0)
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    for images, masks in loader:
        images = images.to(worker.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with torch.autocast(worker.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = net(images)
        cm.update(logits.argmax(1).cpu(), masks)
    if worker.world_size > 1 and _distributed():
        cm.all_reduce()
    net.train(was_training)
    return cm


# ---------------------------------------------------------------------------------------------------------
# The loop


def build_model_for_training(cfg: ExperimentConfig, resume: Optional[str]) -> tuple:
    """The model with its starting weights: a resumed checkpoint, else init_from (stage 2), else an ImageNet
    backbone, else random. Returns (model, resumed checkpoint state or None)."""
    from .model import build_model, load_backbone_weights

    model = build_model(cfg.model)
    if resume:
        ck = load_checkpoint(resume)
        if ck.config.backbone != cfg.model.backbone or ck.config.num_classes != cfg.model.num_classes:
            raise ConfigError(f"{resume}: this run was started with another model ({ck.config.backbone}, "
                              f"{ck.config.num_classes} classes); choose another run name (--name)")
        model.load_state_dict(ck.model.state_dict())
        return model, ck.state
    if cfg.train.init_from:
        ck = load_checkpoint(cfg.train.init_from)
        try:
            model.load_state_dict(ck.model.state_dict())
        except RuntimeError as e:
            raise ConfigError(f"train.init_from={cfg.train.init_from}: weights do not fit model "
                              f"{cfg.model.backbone} ({str(e).splitlines()[0]})") from None
    elif cfg.train.pretrained_backbone:
        load_backbone_weights(model, cfg.train.pretrained_backbone)
    else:
        _init_from_scratch(model)
    return model, None


def _init_from_scratch(model: nn.Module) -> None:
    """Without pretrained weights: each residual unit starts as identity (last BN scale 0, Goyal et al. 2017)
    and the logits start near 0 (loss ln C), so the first iterations are not spent undoing huge outputs."""
    for m in model.modules():
        if hasattr(m, "bn3") and isinstance(m.bn3, nn.BatchNorm2d):
            nn.init.zeros_(m.bn3.weight)
    last = model.classifier[-1]
    if isinstance(last, nn.Conv2d):
        nn.init.normal_(last.weight, std=0.01)
        nn.init.zeros_(last.bias)


def train(cfg: ExperimentConfig, worker: Optional[Worker] = None) -> dict:
    """Train one worker's share of the run; returns the last reported metrics."""
    from .data import build_dataset, dataset_info

    worker = worker or Worker()
    t, rank, device = cfg.train, worker.rank, worker.device
    main = rank == 0
    per_worker_batch(t.batch_size, worker.world_size)
    # Losses weighted by this rank's share of the global batch, so DDP's mean of them is the global batch's.
    share = split_batch(t.batch_size, worker.world_size, rank) * worker.world_size / t.batch_size
    amp = resolve_amp(t.amp, device)
    if t.max_iterations < 1 or t.eval_interval < 1 or t.log_interval < 1:
        raise ConfigError("train.max_iterations, train.eval_interval and train.log_interval must be >= 1")
    num_classes = dataset_info(cfg.data).num_classes
    if num_classes != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but data ({cfg.data.dataset}) has "
                          f"{num_classes} classes")
    torch.manual_seed(t.seed + rank)
    np.random.seed(t.seed + rank)
    random.seed(t.seed + rank)

    # Data: each rank reads its shard; the sampler can start part-way through an epoch.
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True)
    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False)
    sampler = GlobalBatchSampler(len(train_set), t.batch_size, worker.world_size, rank, seed=t.seed)
    steps_per_epoch = sampler.steps_per_epoch
    if steps_per_epoch == 0:
        raise ConfigError(f"data: {len(train_set)} training images are fewer than the global batch {t.batch_size}")
    generator = torch.Generator()
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.data.loader_workers,
                        pin_memory=device.type == "cuda", generator=generator)

    # Model: starting weights, frozen BN (stage 2), then SyncBN + DDP from the runner.
    resume = worker.latest_checkpoint()
    model, state = build_model_for_training(cfg, resume)
    if t.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = t.bn_momentum
    if t.freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.requires_grad_(False)
    if getattr(model, "aux_classifier", None) is not None:  # kept for torchvision weights, not trained
        model.aux_classifier.requires_grad_(False)
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    model = worker.prepare_model(model)
    set_train_mode(model, t.freeze_bn)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    iteration = 0
    if state:
        optimizer.load_state_dict(state["optimizer"])
        iteration = int(state["iteration"])
        rng = state.get("rng") or []
        if len(rng) == worker.world_size:
            _set_rng_state(rng[rank])
        if main:
            print(f"resuming from {resume} at iteration {iteration}/{t.max_iterations}", flush=True)

    writer = None
    if main and worker.log_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(worker.log_dir)

    metrics: dict = {}
    losses: list = []
    train_time, images_seen = 0.0, 0
    window_start, window_images = time.perf_counter(), 0
    started, start_iteration = time.perf_counter(), iteration
    epoch, position = divmod(iteration, steps_per_epoch)
    while iteration < t.max_iterations:
        sampler.set_epoch(epoch)
        if hasattr(train_set, "set_epoch"):  # new augmentations each epoch, the same ones on a replay
            train_set.set_epoch(epoch)
        sampler.start = position
        generator.manual_seed(t.seed * 100003 + epoch * 1009 + rank)  # loader worker seeds per (epoch, rank)
        step_start = time.perf_counter()
        for images, masks in loader:
            lr = poly_lr(t.lr, iteration, t.max_iterations, t.poly_power)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            masks = masks.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(images)
            if logits.shape[-2:] != masks.shape[-2:]:
                logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits.float(), masks, ignore_index=cfg.data.ignore_index) * share
            loss_value = _mean_across(loss.detach(), worker).item()
            if not math.isfinite(loss_value):  # every rank sees the same mean, so all stop together
                raise FloatingPointError(f"loss is {loss_value} at iteration {iteration + 1}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            iteration += 1
            losses.append(loss_value)
            now = time.perf_counter()
            train_time += now - step_start
            images_seen += t.batch_size
            window_images += t.batch_size

            if main and (iteration % t.log_interval == 0 or iteration == t.max_iterations):
                speed = window_images / max(now - window_start, 1e-9)
                per_it = (now - started) / max(iteration - start_iteration, 1)
                print(f"iter {iteration}/{t.max_iterations}  loss {loss_value:.4f}  lr {lr:.2e}  "
                      f"{speed:.1f} img/s  eta {_eta(per_it * (t.max_iterations - iteration))}", flush=True)
                if writer:
                    writer.add_scalar("train/loss", loss_value, iteration)
                    writer.add_scalar("train/lr", lr, iteration)
                    writer.add_scalar("train/images_per_s", speed, iteration)
                window_start, window_images = now, 0

            if iteration % t.eval_interval == 0 or iteration == t.max_iterations:
                cm = evaluate_shard(model, val_set, num_classes, worker, amp, t.channels_last, cfg.data.ignore_index)
                iou = [float(v) for v in cm.iou()]
                metrics = {"iteration": iteration, "epoch": epoch, "loss": float(np.mean(losses)), "lr": lr,
                           "images_per_s": images_seen / max(train_time, 1e-9), "val_miou": float(cm.miou()),
                           "val_iou": iou}
                rng = _gather_rng(worker)
                if main:
                    print(f"eval at iter {iteration}: val mIoU {metrics['val_miou']:.4f}", flush=True)
                    if writer:
                        writer.add_scalar("val/miou", metrics["val_miou"], iteration)
                        writer.flush()
                _report(cfg, worker, model, optimizer, scaler, metrics, rng)
                losses, train_time, images_seen = [], 0.0, 0
                window_start = time.perf_counter()
            if iteration >= t.max_iterations:
                break
            step_start = time.perf_counter()
        epoch, position = epoch + 1, 0
    if writer:
        writer.close()
    return metrics


def _report(cfg, worker: Worker, model, optimizer, scaler, metrics: dict, rng: list) -> None:
    """Every rank reports; rank 0 attaches a checkpoint directory with model.ckpt (removed afterwards:
    the runner copies what it keeps)."""
    if worker.rank != 0:
        worker.report(metrics, None)
        return
    folder = tempfile.mkdtemp(prefix="deeplab-ckpt-")
    try:
        save_checkpoint(os.path.join(folder, CHECKPOINT_FILE), worker.plain_model(model), cfg,
                        iteration=metrics["iteration"], optimizer=optimizer.state_dict(),
                        scaler=scaler.state_dict(), metrics=metrics, rng=rng)
        worker.report(metrics, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

