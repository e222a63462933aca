"""ConfusionMatrix against a plain set-intersection computation, and its all_reduce across two gloo workers."""
from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deeplab import ConfusionMatrix


def _random_batch(seed, n=2, h=17, w=23, classes=7, absent=(5,)):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (n, h, w), generator=g)
    pred = torch.randint(0, classes, (n, h, w), generator=g)
    for c in absent:  # a class nobody has: its IoU must be NaN and stay out of the mean
        target[target == c] = 0
        pred[pred == c] = 1
    target[torch.rand(n, h, w, generator=g) < 0.15] = 255
    only_pred = 6  # a class only predicted: IoU 0, and it counts in the mean
    target[target == only_pred] = 2
    return pred, target


def _reference(preds, targets, classes, ignore=255):
    """Per class: |pred=c and gt=c| / |pred=c or gt=c| over non-ignored pixels, as Python sets."""
    pixels = [(int(p), int(t)) for pred, tgt in zip(preds, targets)
              for p, t in zip(pred.reshape(-1).tolist(), tgt.reshape(-1).tolist()) if t != ignore]
    ious = []
    for c in range(classes):
        in_pred = {i for i, (p, _) in enumerate(pixels) if p == c}
        in_gt = {i for i, (_, t) in enumerate(pixels) if t == c}
        union = in_pred | in_gt
        ious.append(len(in_pred & in_gt) / len(union) if union else math.nan)
    present = [v for v in ious if not math.isnan(v)]
    acc = sum(p == t for p, t in pixels) / len(pixels)
    return ious, sum(present) / len(present), acc


def test_matches_plain_set_computation():
    batches = [_random_batch(s) for s in range(3)]
    cm = ConfusionMatrix(7)
    for pred, target in batches:
        cm.update(pred, target)
    ious, miou, acc = _reference([b[0] for b in batches], [b[1] for b in batches], 7)
    got = cm.iou().tolist()
    assert math.isnan(got[5]) and math.isnan(ious[5])
    assert got[6] == 0.0
    for a, b in zip(got, ious):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)
    assert cm.miou() == pytest.approx(miou, abs=1e-12)
    assert cm.pixel_accuracy() == pytest.approx(acc, abs=1e-12)
    d = cm.to_dict([f"c{i}" for i in range(7)])
    assert d["iou"]["c5"] is None and d["miou"] == pytest.approx(miou)
    cm.reset()
    assert cm.mat.sum() == 0 and math.isnan(cm.miou())


def test_rejects_labels_outside_the_classes():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="target holds labels outside"):
        cm.update(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 3, 255]))
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long))


def test_all_reduce_is_a_noop_without_a_process_group():
    pred, target = _random_batch(0)
    cm = ConfusionMatrix(7)
    cm.update(pred, target)
    before = cm.mat.clone()
    assert cm.all_reduce() is cm and torch.equal(cm.mat, before)


def _worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cm = ConfusionMatrix(7)
        for seed in range(rank, 4, world):  # each worker its shard of the batches
            cm.update(*_random_batch(seed))
        cm.all_reduce()
        torch.save(cm.mat, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_gloo_workers_matches_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = ConfusionMatrix(7)
    for seed in range(4):
        single.update(*_random_batch(seed))
    for rank in range(2):
        mat = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(mat, single.mat)
