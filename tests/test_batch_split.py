"""The global batch split over any number of workers (elastic training): shares, data order, loss weights.
Plain single-process references; the synchronized BatchNorm side is in test_syncbn.py (3 gloo processes)."""
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from deeplab.train_batch import split_batch
from deeplab.train_loop import GlobalBatchSampler

ROOT = Path(__file__).parents[1]
BATCH_FUNCTIONS = ("split_batch", "per_worker_batch", "bn_momentum_warning", "evaluations_per_run")


def test_the_batch_arithmetic_loads_without_torch_and_deeplab_config_still_offers_it():
    """The config checks run it on a driver that need not load torch; deeplab.config (its home before issue 32)
    gives the same functions, whichever of the two a fresh interpreter imports first."""
    names = ", ".join(BATCH_FUNCTIONS)
    same = f"assert ({names},) == tuple(getattr(t, n) for n in {BATCH_FUNCTIONS!r})"
    for code in (f"import sys, deeplab.train_batch as t; assert 'torch' not in sys.modules, 'torch loaded'; "
                 f"from deeplab.config import {names}; {same}; print('ok')",
                 f"from deeplab.config import {names}; import deeplab.train_batch as t; {same}; print('ok')"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


def test_shares_differ_by_one_at_most_and_add_up_to_the_global_batch():
    assert [split_batch(8, 3, r) for r in range(3)] == [3, 3, 2]
    assert [split_batch(16, 8, r) for r in range(8)] == [2] * 8
    for batch in range(1, 40):
        for workers in range(1, 9):
            shares = [split_batch(batch, workers, r) for r in range(workers)]
            assert sum(shares) == batch and max(shares) - min(shares) <= 1


def _epoch(size, batch, workers, epoch, seed=5, start=0):
    """Per global batch of the epoch, the images every rank takes (rank order)."""
    samplers = [GlobalBatchSampler(size, batch, workers, r, seed) for r in range(workers)]
    for s in samplers:
        s.set_epoch(epoch)
        s.start = start
    return [sum(parts, []) for parts in zip(*samplers)], [[len(p) for p in parts] for parts in zip(*samplers)]


def test_batches_of_an_epoch_do_not_depend_on_the_number_of_workers():
    size, batch = 50, 8  # 6 global batches per epoch, 2 images left over
    two, _ = _epoch(size, batch, 2, epoch=3)
    three, shares = _epoch(size, batch, 3, epoch=3)
    assert [sorted(b) for b in two] == [sorted(b) for b in three] and len(two) == 6
    assert all(s == [3, 3, 2] for s in shares)
    seen = sum(two, [])
    assert len(seen) == len(set(seen)) == 48  # each image of the epoch once
    assert _epoch(size, batch, 2, epoch=4)[0] != two  # a new order every epoch


def test_a_run_resized_mid_epoch_sees_each_image_of_the_epoch_once():
    size, batch = 48, 8
    before, _ = _epoch(size, batch, 2, epoch=1)
    after, _ = _epoch(size, batch, 3, epoch=1, start=2)  # 2 workers did 2 global batches, 3 do the rest
    seen = sum(before[:2] + after, [])
    assert sorted(seen) == list(range(size))


def test_with_an_even_split_each_rank_gets_what_distributed_sampler_gives():
    """The reference: torch's DistributedSampler (seed, epoch) cut into per-rank batches of batch/W."""
    size, batch, workers, epoch = 48, 8, 4, 2
    for rank in range(workers):
        reference = DistributedSampler(list(range(size)), num_replicas=workers, rank=rank, shuffle=True, seed=7)
        reference.set_epoch(epoch)
        flat = list(reference)
        per_rank = [flat[i:i + batch // workers] for i in range(0, len(flat), batch // workers)]
        ours = GlobalBatchSampler(size, batch, workers, rank, seed=7)
        ours.set_epoch(epoch)
        assert list(ours) == per_rank


def test_share_weighted_losses_average_to_the_global_batch_loss():
    """DDP averages the workers' gradients; each worker's mean loss times share * W / B makes that average
    the gradient of the mean over the global batch, however unevenly it is split."""
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    x, target = torch.randn(8, 5), torch.randn(8)

    def grad(rows, weight=1.0):  # of a worker's mean squared error over its rows
        return torch.autograd.grad(((x[rows] @ w - target[rows]) ** 2).mean() * weight, w)[0]

    batch, workers = 8, 3
    reference = grad(list(range(batch)))
    shares = [list(range(rank, batch, workers)) for rank in range(workers)]  # what each rank takes: 3, 3, 2
    weighted = sum(grad(rows, split_batch(batch, workers, r) * workers / batch) for r, rows in enumerate(shares))
    torch.testing.assert_close(weighted / workers, reference)
    unweighted = sum(grad(rows) for rows in shares) / workers
    assert not torch.allclose(unweighted, reference)  # without the weights, 3/3/2 would be biased
