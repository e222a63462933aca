"""One worker's training loop: the paper's protocol (Section 4.1), from data to saved checkpoint.

The loop knows nothing of Ray. Whoever runs it hands in a `Worker`: rank, world size, device, how to wrap the
model (SyncBN + DDP under Ray), how to report metrics with a checkpoint and where the last checkpoint is.
`Worker()` with its defaults is a plain single process (tests, `cluster.bench`).

Protocol: SGD (momentum, weight decay), poly learning rate (1 - it/max_it)^power set every iteration,
cross-entropy on logits at label size with 255 ignored, global batch `train.batch_size` split across the
workers. Every `train.eval_interval` iterations and at the end all workers evaluate their shard of the
validation set, all-reduce the confusion matrix, and call `report` once; rank 0 attaches a directory
holding `model.ckpt` (model with plain BN, experiment config, iteration, optimizer, metrics, RNG states).
Resuming from such a checkpoint restores weights, optimizer, iteration, sampler position and RNG states. The
global batches depend on (seed, epoch) only, not on the number of workers (`GlobalBatchSampler`), so a run
resumed by another number of workers (an elastic run resized) continues the same sequence of global batches.

Read top-down as torchvision's reference script: `setup` (data, model, optimizer, resumed state) ->
`train_one_epoch` (`train_step`, `log_progress`) -> `evaluate_and_report` (`evaluate_shard`, `_report`).
"""
from __future__ import annotations

import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset

from .checkpoint import CHECKPOINT_FILE, load_checkpoint, read_weights_file, save_checkpoint, unwrap
from .cli import error_line
from .config import ConfigError, ExperimentConfig
from .data import build_dataset, dataset_for_model, dataset_info
from .inference import align_corners, evaluate, model_predictor
from .model import build_model, load_backbone_weights
from .pause import pause_for_test
from .progress import eta_text, remaining_seconds
from .train_batch import bn_momentum_warning, per_worker_batch, split_batch
from .visualize import validation_grid


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
    synchronized_bn: bool = False  # prepare_model makes BatchNorm normalize over every worker's batch
    log_dir: Optional[str] = None  # TensorBoard event files (rank 0)
    # Elastic runs and reruns: rank 0 records how far the run got ({"reached_iteration", "resumes", "world_size"})
    # for the group that resumes after a resize or a stop to read; every rank asks at the same iterations whether
    # a node is being preempted (then all checkpoint at once).
    record_progress: Callable[[dict], None] = lambda progress: None
    recorded_progress: Callable[[], Optional[dict]] = lambda: None
    preempted: Callable[[], bool] = lambda: False


# ---------------------------------------------------------------------------------------------------------
# Pieces of the protocol, small enough to test alone


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float = 0.9) -> float:
    """The paper's "poly" policy: base_lr * (1 - iteration / max_iterations) ** power."""
    return base_lr * (1 - iteration / max_iterations) ** power


def cuda_amp_for_capability(capability: tuple) -> torch.dtype:
    """amp: auto on a GPU of this compute capability: bf16 where it is native (Ampere, 8.0, and newer), fp16
    with GradScaler before that. Not torch.cuda.is_bf16_supported(): by default it counts emulation, so a
    T4 (7.5) or V100 (7.0) would train in slow emulated bf16."""
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """train.amp -> autocast dtype (None: full precision). auto: bf16 on GPUs with native bf16 (compute
    capability 8.0+), fp16 on older GPUs, bf16 on CPUs with native bf16 (AVX512-BF16 / AMX), else off."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs a CUDA device; use bf16, auto or off on CPU")
        return torch.float16
    if device.type == "cuda":
        return cuda_amp_for_capability(torch.cuda.get_device_capability(device))
    if device.type == "cpu":
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
            getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if native else None
    return None


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


# ---------------------------------------------------------------------------------------------------------
# Setting up: data, model with its starting weights, optimizer, resumed state


@dataclass
class Run:
    """Everything one worker trains with; ``iteration`` counts optimizer steps taken."""

    cfg: ExperimentConfig
    worker: Worker
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler
    train_set: Any
    val_set: Any
    sampler: GlobalBatchSampler
    generator: torch.Generator
    loader: DataLoader
    batch: int  # this worker's share of the global batch
    steps_per_epoch: int
    num_classes: int
    amp: Optional[torch.dtype]
    memory_format: torch.memory_format
    iteration: int = 0
    writer: Any = None  # TensorBoard SummaryWriter on rank 0 when the runner gives a log_dir
    batches: list = field(default_factory=list)  # [images, iterations] runs this rank trained since its last report
    resumes: list = field(default_factory=list)  # every restart of the run from a checkpoint, with group sizes
    resumed_metrics: dict = field(default_factory=dict)  # what the checkpoint resumed from had reported

    @property
    def main(self) -> bool:
        return self.worker.rank == 0


def build_model_for_training(cfg: ExperimentConfig, resume: Optional[str]) -> tuple:
    """The model with its starting weights: a resumed checkpoint, else init_from (stage 2), else an ImageNet
    backbone, else the builder's from-scratch start. Returns (model, resumed checkpoint state or None)."""
    if resume:
        ck = load_checkpoint(resume)
        if ck.config.backbone != cfg.model.backbone or ck.config.num_classes != cfg.model.num_classes:
            raise ConfigError(f"{resume}: this run was started with another model ({ck.config.backbone}, "
                              f"{ck.config.num_classes} classes); choose another run name (--name)")
        model = build_model(cfg.model, atrous_layout=ck.config.atrous_layout)  # the rule the run began with
        model.load_state_dict(ck.model.state_dict())
        return model, ck.state
    model = build_model(cfg.model)
    if cfg.train.init_from:
        ck = load_checkpoint(cfg.train.init_from)
        try:
            model.load_state_dict(ck.model.state_dict())
        except RuntimeError as e:
            raise ConfigError(f"train.init_from={cfg.train.init_from}: weights do not fit model "
                              f"{cfg.model.backbone} ({error_line(e)})") from None
    elif cfg.train.pretrained_backbone:
        try:
            load_backbone_weights(model, read_weights_file(cfg.train.pretrained_backbone))
        except ValueError as e:  # CheckpointError already names the file
            raise ConfigError(f"train.pretrained_backbone={cfg.train.pretrained_backbone}: {e}") from None
    return model, None


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _data(cfg: ExperimentConfig, worker: Worker) -> tuple:
    """(train set, val set, sampler, loader generator, loader, steps per epoch): each rank reads its share of
    every global batch; the sampler can start part-way through an epoch."""
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True)
    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False)
    sampler = GlobalBatchSampler(len(train_set), cfg.train.batch_size, worker.world_size, worker.rank,
                                 seed=cfg.train.seed)
    steps_per_epoch = sampler.steps_per_epoch
    if steps_per_epoch == 0:
        raise ConfigError(f"data: {len(train_set)} training images are fewer than the global batch "
                          f"{cfg.train.batch_size}")
    generator = torch.Generator()
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.data.loader_workers,
                        pin_memory=worker.device.type == "cuda", generator=generator)
    return train_set, val_set, sampler, generator, loader, steps_per_epoch


def _prepare_model(model: nn.Module, cfg: ExperimentConfig, worker: Worker, memory_format) -> nn.Module:
    """BN decay, frozen BN (stage 2: it stays frozen through every train()/eval() switch), on the device,
    then the runner's wrapping (SyncBN + DDP under Ray)."""
    t = cfg.train
    if t.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = t.bn_momentum
    if t.freeze_bn:
        model.freeze_batchnorm()
    model = worker.prepare_model(model.to(worker.device, memory_format=memory_format))
    return model.train()


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """SGD groups as the authors' implementation regularizes: weight decay on convolution and linear weights,
    none on normalization scales/shifts or biases. Told apart by shape (1-D: no decay), so any norm layer
    (BatchNorm, LayerNorm, GroupNorm) of any backbone is left undecayed. Frozen parameters are left out."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _restore(run: Run, state: Optional[dict], resume: Optional[str]) -> None:
    """Optimizer, iteration and this rank's RNG states from a resumed checkpoint, and the restart recorded.

    The run's restarts so far are those the previous attempt recorded with its progress (a stop may have lost
    the checkpoint that held the latest one), else those the checkpoint holds. A run stopped before its first
    checkpoint starts again from the beginning: that too is a restart, its iterations done again."""
    progress = run.worker.recorded_progress() or {}
    history = progress["resumes"] if "resumes" in progress else (state or {}).get("resumes", [])
    if not state:
        if progress.get("reached_iteration"):
            run.resumes = [*history, {"workers": [progress.get("world_size") or run.worker.world_size,
                                                  run.worker.world_size], "checkpoint_iteration": 0,
                                      "reached_iteration": progress["reached_iteration"], "time": time.time()}]
        return
    saved_groups = len(state["optimizer"].get("param_groups", []))
    if saved_groups != len(run.optimizer.param_groups):
        raise ConfigError(f"{resume}: its optimizer has {saved_groups} parameter group(s), this version trains "
                          f"with {len(run.optimizer.param_groups)} (no weight decay on BN and biases): start a new "
                          "run (another --name), with train.init_from to keep the weights")
    run.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler") and run.scaler.is_enabled():  # fp16: the loss scale and its growth tracker
        run.scaler.load_state_dict(state["scaler"])
    run.iteration = int(state["iteration"])
    run.resumed_metrics = state.get("metrics") or {}
    rng = state.get("rng") or []
    if len(rng) == run.worker.world_size:
        _set_rng_state(rng[run.worker.rank])
    resumed = {"workers": [int(state.get("world_size") or len(rng) or 1), run.worker.world_size],
               "checkpoint_iteration": run.iteration, "reached_iteration": progress.get("reached_iteration"),
               "time": time.time()}  # when the new group was ready to train again
    run.resumes = [*history, resumed]
    if run.main:
        print(f"resuming from {resume} at iteration {run.iteration}/{run.cfg.train.max_iterations}", flush=True)
        if resumed["workers"][0] != resumed["workers"][1]:
            print(describe_resume(resumed), flush=True)


def describe_resume(record: dict) -> str:
    """``workers 2 -> 3 at iteration 140, resumed from checkpoint of iteration 120`` (the work in between is
    done again; "at iteration" is left out when the previous group's progress is unknown)."""
    before, after = record["workers"]
    reached = record.get("reached_iteration")
    at = f" at iteration {reached}" if reached is not None else ""
    start = record["checkpoint_iteration"]
    return f"workers {before} -> {after}{at}, " + (f"resumed from checkpoint of iteration {start}" if start
                                                   else "started again from the beginning (no checkpoint yet)")


def setup(cfg: ExperimentConfig, worker: Worker) -> Run:
    """Data, model, optimizer and resumed state for one worker, seeded per rank."""
    t = cfg.train
    per_worker_batch(t.batch_size, worker.world_size, worker.synchronized_bn, t.freeze_bn)
    batch = split_batch(t.batch_size, worker.world_size, worker.rank)
    amp = resolve_amp(t.amp, worker.device)
    if worker.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed-size crops: cuDNN times each conv's algorithms once, then reuses
    num_classes = cfg.model.num_classes
    dataset_for_model(cfg.data, num_classes, f"model.num_classes={num_classes}")
    _seed(t.seed + worker.rank)
    train_set, val_set, sampler, generator, loader, steps_per_epoch = _data(cfg, worker)
    resume = worker.latest_checkpoint()
    model, state = build_model_for_training(cfg, resume)
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model = _prepare_model(model, cfg, worker, memory_format)
    optimizer = torch.optim.SGD(param_groups(model, t.weight_decay), lr=t.lr, momentum=t.momentum)
    scaler = torch.amp.GradScaler(worker.device.type, enabled=amp == torch.float16)
    run = Run(cfg, worker, model, optimizer, scaler, train_set, val_set, sampler, generator, loader, batch,
              steps_per_epoch, num_classes, amp, memory_format)
    _restore(run, state, resume)
    warning = bn_momentum_warning(t)
    if run.main and warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if run.main and worker.log_dir:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(worker.log_dir)
    return run


# ---------------------------------------------------------------------------------------------------------
# The loop: train_one_epoch, train_step, evaluate_and_report


class Meter:
    """Loss and speed since the last evaluation (what a report holds) and since the last progress line."""

    WARMUP_STEPS = 2  # the first steps of a process (allocator, oneDNN kernel choice) are not its speed

    def __init__(self, iteration: int):
        self.started, self.start_iteration = time.perf_counter(), iteration
        self.window_start, self.window_images, self.steps_seen = self.started, 0, 0
        self.reset()

    def reset(self) -> None:
        self.losses, self.train_time, self.images, self.step_speeds = [], 0.0, 0, []
        self.window_start = time.perf_counter()

    def step(self, loss: float, seconds: float, images: int) -> None:
        self.losses.append(loss)
        self.train_time += seconds
        self.images += images
        self.window_images += images
        self.steps_seen += 1
        if self.steps_seen > self.WARMUP_STEPS:
            self.step_speeds.append(images / max(seconds, 1e-9))

    @property
    def median_speed(self) -> float:
        """Median images/s of the steps since the last report (after warm-up): what a benchmark quotes,
        robust to a step slowed by another process."""
        return float(np.median(self.step_speeds)) if self.step_speeds else self.images / max(self.train_time, 1e-9)

    def progress(self, iteration: int, max_iterations: int) -> tuple:
        """(images/s since the last progress line, ETA text); starts the next window."""
        now = time.perf_counter()
        speed = self.window_images / max(now - self.window_start, 1e-9)
        left = remaining_seconds(iteration - self.start_iteration, max_iterations - self.start_iteration,
                                 now - self.started)
        self.window_start, self.window_images = now, 0
        return speed, eta_text(left)


def train_step(run: Run, images: torch.Tensor, masks: torch.Tensor) -> tuple:
    """One SGD step at the poly learning rate; returns (lr, loss averaged over workers). A non-finite loss
    raises FloatingPointError on every rank at once (they all see the same mean)."""
    t, device = run.cfg.train, run.worker.device
    pause_for_test("step", run.iteration + 1)
    lr = poly_lr(t.lr, run.iteration, t.max_iterations, t.poly_power)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    images = images.to(device, non_blocking=True, memory_format=run.memory_format)
    masks = masks.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None):
        logits = run.model(images)
    if logits.shape[-2:] != masks.shape[-2:]:
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear",
                               align_corners=align_corners(run.model))
    # weighted by this rank's share of the global batch, so that DDP's mean over ranks is the global batch's
    share = run.batch * run.worker.world_size / t.batch_size
    loss = F.cross_entropy(logits.float(), masks, ignore_index=run.cfg.data.ignore_index) * share
    loss_value = _mean_across(loss.detach(), run.worker).item()
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"loss is {loss_value} at iteration {run.iteration + 1}")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.iteration += 1
    return lr, loss_value


def log_progress(run: Run, meter: Meter, lr: float, loss: float) -> None:
    speed, eta = meter.progress(run.iteration, run.cfg.train.max_iterations)
    print(f"iter {run.iteration}/{run.cfg.train.max_iterations}  loss {loss:.4f}  lr {lr:.2e}  "
          f"{speed:.1f} img/s  eta {eta}", flush=True)
    if run.writer:
        run.writer.add_scalar("train/loss", loss, run.iteration)
        run.writer.add_scalar("train/lr", lr, run.iteration)
        run.writer.add_scalar("train/images_per_s", speed, run.iteration)


def evaluate_shard(model: nn.Module, dataset, num_classes: int, worker: Worker, amp: Optional[torch.dtype] = None,
                   ignore_index: int = 255):
    """This rank's share of the validation set (every world_size-th image), all-reduced: the confusion
    matrix of the whole set on every rank. Runs the bare module: no DDP collectives in eval."""
    shard = Subset(dataset, range(worker.rank, len(dataset), worker.world_size))
    loader = DataLoader(shard, batch_size=1, shuffle=False, num_workers=0)
    predict = model_predictor(unwrap(model), device=worker.device, amp=amp)
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False  # whole images of many sizes: timing algorithms for each would cost more
    try:
        return evaluate(predict, loader, num_classes, ignore_index).all_reduce()
    finally:
        torch.backends.cudnn.benchmark = benchmark


def evaluate_and_report(run: Run, meter: Meter, epoch: int, lr: float) -> dict:
    """Every rank evaluates its shard and reports the same metrics; rank 0 attaches the checkpoint."""
    pause_for_test("evaluate", run.iteration)
    cm = evaluate_shard(run.model, run.val_set, run.num_classes, run.worker, run.amp, run.cfg.data.ignore_index)
    metrics = {"iteration": run.iteration, "epoch": epoch, "loss": float(np.mean(meter.losses)), "lr": lr,
               "images_per_s": meter.images / max(meter.train_time, 1e-9), "images_per_s_median": meter.median_speed,
               "val_miou": float(cm.miou()),
               "val_iou": [float(v) for v in cm.iou()], "world_size": run.worker.world_size,
               "worker_batches": run.batches, "resumes": run.resumes}
    run.batches = []
    rng = _gather_rng(run.worker)
    if run.main:
        print(f"eval at iter {run.iteration}: val mIoU {metrics['val_miou']:.4f}", flush=True)
        if run.writer:
            run.writer.add_scalar("val/miou", metrics["val_miou"], run.iteration)
            info = dataset_info(run.cfg.data)  # image | ground truth | prediction at OS8, as the demo draws it
            run.writer.add_image("val/predictions_os8", validation_grid(
                unwrap(run.model), run.val_set, info.palette, amp=run.amp, ignore_index=run.cfg.data.ignore_index,
                names=info.class_names), run.iteration, dataformats="HWC")
            run.writer.flush()
    _report(run, metrics, rng)
    meter.reset()
    return metrics


def _report(run: Run, metrics: dict, rng: list) -> None:
    """Every rank reports; rank 0 attaches a checkpoint directory with model.ckpt (removed afterwards:
    the runner copies what it keeps)."""
    worker = run.worker
    if worker.rank != 0:
        worker.report(metrics, None)
        return
    folder = tempfile.mkdtemp(prefix="deeplab-ckpt-")
    try:
        save_checkpoint(os.path.join(folder, CHECKPOINT_FILE), worker.plain_model(run.model), run.cfg,
                        iteration=metrics["iteration"], optimizer=run.optimizer.state_dict(),
                        scaler=run.scaler.state_dict(), metrics=metrics, rng=rng, world_size=worker.world_size,
                        resumes=run.resumes)
        worker.report(metrics, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def train_one_epoch(run: Run, meter: Meter, epoch: int, position: int) -> Optional[dict]:
    """Steps through this rank's shard of ``epoch`` from batch ``position``, logging and evaluating on
    schedule, until the epoch or the run ends; returns the last evaluation's metrics (None: none ran)."""
    t = run.cfg.train
    run.sampler.set_epoch(epoch)
    if hasattr(run.train_set, "set_epoch"):  # new augmentations each epoch, the same ones on a replay
        run.train_set.set_epoch(epoch)
    run.sampler.start = position
    run.generator.manual_seed(t.seed * 100003 + epoch * 1009 + run.worker.rank)  # loader worker seeds
    metrics = None
    step_start = time.perf_counter()
    for images, masks in run.loader:
        lr, loss = train_step(run, images, masks)
        meter.step(loss, time.perf_counter() - step_start, t.batch_size)
        _count_batch(run, len(images))
        last = run.iteration == t.max_iterations
        if run.main:
            run.worker.record_progress({"reached_iteration": run.iteration, "resumes": run.resumes,
                                        "world_size": run.worker.world_size})
            if run.iteration % t.log_interval == 0 or last:
                log_progress(run, meter, lr, loss)
        # a node about to be preempted: checkpoint now, while it can be written whole (asked on every rank alike)
        if (run.iteration % t.eval_interval == 0 or last
                or (run.iteration % t.log_interval == 0 and run.worker.preempted())):
            metrics = evaluate_and_report(run, meter, epoch, lr)
        if run.iteration >= t.max_iterations:
            break
        step_start = time.perf_counter()
    return metrics


def _count_batch(run: Run, images: int) -> None:
    """Log the images this rank trained on this iteration, as [images, iterations] runs."""
    if run.batches and run.batches[-1][0] == images:
        run.batches[-1][1] += 1
    else:
        run.batches.append([images, 1])


def train(cfg: ExperimentConfig, worker: Optional[Worker] = None) -> dict:
    """Train one worker's share of the run; returns the last reported metrics."""
    run = setup(cfg, worker or Worker())
    if run.iteration >= cfg.train.max_iterations and run.resumed_metrics:
        # a finished run started again (stopped after its last report): its result once more, for whoever waits
        # for one (a Tune trial restored after a SIGTERM); every rank alike, as for any report
        run.worker.report(run.resumed_metrics, None)
        return run.resumed_metrics
    meter = Meter(run.iteration)
    metrics: dict = {}
    epoch, position = divmod(run.iteration, run.steps_per_epoch)
    try:
        while run.iteration < cfg.train.max_iterations:
            metrics = train_one_epoch(run, meter, epoch, position) or metrics
            epoch, position = epoch + 1, 0
    finally:
        if run.writer:
            run.writer.close()
    return metrics
