"""The training batch arithmetic: how the global batch (train.batch_size) splits over the workers, whether each
share can train BatchNorm, whether BatchNorm's running statistics settle within the run, and how many
evaluations a run makes.

Apart from the training loop (deeplab.train_loop) so that the config checks that need it (the cluster section's
worker count, the search's pruning) can use it on the driver without torch; apart from the config package because
it is about training, not about reading a config.
"""
from __future__ import annotations

import math
from typing import Optional

from .config.sections import TrainConfig
from .config.values import ConfigError


def split_batch(global_batch: int, world_size: int, rank: int) -> int:
    """Rank's share of the global batch: every world_size-th image of it, so shares differ by one at most
    (8 over 3 workers: 3, 3, 2). Synchronized BatchNorm sees the global batch whatever the shares."""
    return len(range(rank, global_batch, world_size))


def per_worker_batch(batch_size: int, world_size: int, synchronized_bn: bool = False, frozen_bn: bool = False,
                     workers_key: Optional[str] = None) -> int:
    """The smallest share of the global batch over ``world_size`` workers (they differ by one at most). Every
    worker needs an image; one image per worker is refused only where a BatchNorm layer in training mode would
    see one value per channel (the image-pooling branch after global pooling): one worker, or no synchronized
    BN. Synchronized BN over several workers normalizes over the global batch; frozen BN (eval mode) uses its
    running statistics. ``workers_key``: the field that set the worker count, named in the error too."""
    keys = ("train.batch_size",) + ((workers_key,) if workers_key else ())
    per_worker = split_batch(batch_size, world_size, world_size - 1)
    if per_worker < 1:
        raise ConfigError(f"train.batch_size={batch_size} is the global batch: fewer images than the {world_size} "
                          "workers, and every worker needs one: raise train.batch_size or use fewer workers", keys)
    seen_by_bn = batch_size if synchronized_bn else per_worker
    if seen_by_bn < 2 and not frozen_bn:
        why = "one worker" if world_size == 1 else "BatchNorm not synchronized across the workers"
        raise ConfigError(f"train.batch_size={batch_size} over {world_size} worker(s) is {per_worker} image per "
                          f"worker and, with {why}, BatchNorm (the image-pooling branch) would see one value per "
                          "channel: raise train.batch_size, or freeze BN (train.freeze_bn)", keys)
    return per_worker


def bn_momentum_warning(train: TrainConfig) -> Optional[str]:
    """One line when BatchNorm's running statistics would still be mostly their initial values at the end of
    the run ((1 - bn_momentum) ** max_iterations > 0.5), naming a value that would work; else None."""
    momentum = 0.1 if train.bn_momentum is None else train.bn_momentum
    kept = (1 - momentum) ** train.max_iterations
    if train.freeze_bn or kept <= 0.5:
        return None
    needed = 1 - 0.5 ** (1 / train.max_iterations)
    scale = 10 ** math.floor(math.log10(needed))
    suggest = min(1.0, math.ceil(needed / scale) * scale)
    return (f"train.bn_momentum={momentum:g} leaves {kept:.0%} of BatchNorm's initial running statistics after "
            f"{train.max_iterations} iterations, so evaluation would normalize with them: set train.bn_momentum "
            f">= {suggest:.1g} for a run this short (the paper's 0.0003 suits 30000 iterations)")


def evaluations_per_run(train: TrainConfig, cap: Optional[int] = None) -> int:
    """How many times a run reports val mIoU: every eval_interval iterations and at the end."""
    iterations = min(train.max_iterations, cap or train.max_iterations)
    return math.ceil(iterations / train.eval_interval)
