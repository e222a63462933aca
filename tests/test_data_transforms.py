"""The paper's augmentation: 255 padding, pixel-exact image/mask alignment, reproducible randomness."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from data_trees import blocks, make_voc
from deeplab.config import DataConfig
from deeplab.data import DatasetError, EvalTransform, TrainTransform, build_dataset, denormalize
from deeplab.data.synthetic import render

# Labels 0-7 painted in the 8 corners of the RGB cube: no blend of other corners can equal a corner,
# so a pixel that has exactly a corner colour after bilinear resizing lies inside one label's region.
CORNERS = np.array(list(itertools.product((0, 255), repeat=3)), dtype=np.uint8)


def test_crops_pad_mask_with_255_never_0():
    mask = np.zeros((20, 30), np.uint8)  # all background: a 0-padding bug would be invisible in the labels
    image = np.full((20, 30, 3), 200, np.uint8)
    t = TrainTransform(crop_size=65, scale_min=0.5, scale_max=2.0, flip=True)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        p = t.sample(20, 30, np.random.default_rng(seed))
        img, target = t(image, mask, rng)
        assert img.shape == (3, 65, 65) and target.shape == (65, 65) and target.dtype == torch.int64
        h, w = min(p["height"], 65), min(p["width"], 65)
        assert (target[:h, :w] == 0).all() and int((target == 255).sum()) == 65 * 65 - h * w
        assert (img[:, target == 255] == 0).all()  # the mean pixel: exactly 0 after normalization
        assert (img[:, :h, :w] != 0).all()


def test_flips_and_scales_keep_image_and_mask_aligned_pixel_exact():
    rng = np.random.default_rng(0)
    mask = blocks(rng, 61, 83, np.arange(8), block=8)
    image = CORNERS[mask]
    t = TrainTransform(crop_size=97, scale_min=0.5, scale_max=2.0, flip=True)
    flipped = 0
    for seed in range(24):
        p = t.sample(61, 83, np.random.default_rng(seed))
        flipped += p["flip"]
        img, target = t(image, mask, np.random.default_rng(seed))
        pixels = denormalize(img).reshape(-1, 3)
        target = target.numpy().reshape(-1)
        valid = target != 255
        corner = (pixels[:, None, :] == CORNERS[None]).all(-1)  # N x 8
        pure = valid & corner.any(1)
        assert pure.sum() > 0.25 * valid.sum()  # bilinear blends block edges; the rest are pure
        np.testing.assert_array_equal(corner[pure].argmax(1), target[pure])  # the colour says the label
        assert (pixels[~valid] == np.round(np.array([0.485, 0.456, 0.406]) * 255)).all()
        # Reference geometry: the labels equal a plain nearest-neighbour resample of the original.
        h, w = p["height"], p["width"]
        ys = np.minimum(((np.arange(h) + 0.5) * 61 / h).astype(int), 60)
        xs = np.minimum(((np.arange(w) + 0.5) * 83 / w).astype(int), 82)
        ref = mask[ys][:, xs][p["top"]:p["top"] + 97, p["left"]:p["left"] + 97]
        if p["flip"]:
            ref = ref[:, ::-1]
        got = target.reshape(97, 97)[: ref.shape[0], : ref.shape[1]]
        assert (got == ref).mean() > 0.97  # Pillow's nearest may round a boundary pixel the other way
    assert 0 < flipped < 24


def test_eval_pads_to_val_size_and_refuses_larger_images(tmp_path):
    make_voc(tmp_path, size=(40, 56))
    cfg = DataConfig(dataset="voc", root=str(tmp_path), val_size=64)
    image, mask = build_dataset(cfg, "val", train=False)[0]
    assert image.shape == (3, 64, 64) and (mask[40:] == 255).all() and (mask[:, 56:] == 255).all()
    assert (image[:, 40:] == 0).all()
    full = build_dataset(DataConfig(dataset="voc", root=str(tmp_path)), "val", train=False)[0]
    assert torch.equal(mask[:40, :56], full[1]) and torch.equal(image[:, :40, :56], full[0])
    with pytest.raises(DatasetError, match=r"2007_000033\.jpg: 56x40 image is larger than data.val_size 50x32"):
        build_dataset(DataConfig(dataset="voc", root=str(tmp_path), val_size=[32, 50]), "val", train=False)[0]
    with pytest.raises(ValueError):
        EvalTransform(16)(np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20), np.uint8))


def _cfg(**kw):
    return DataConfig(synthetic_size=49, crop_size=33, synthetic_train=8, seed=3, **kw)


def test_augmentation_is_a_function_of_seed_epoch_index_across_workers_and_ranks():
    ds = build_dataset(_cfg(), "train", train=True)
    direct = [ds[i] for i in range(8)]
    # Two ranks of a DistributedSampler, each with two loader workers, see exactly the same samples.
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2)
        seen = [i for i in sampler]
        for batch, idx in zip(loader, [seen[k:k + 2] for k in range(0, len(seen), 2)]):
            for j, i in enumerate(idx):
                assert torch.equal(batch[0][j], direct[i][0]) and torch.equal(batch[1][j], direct[i][1])
    # A new epoch draws new crops; persistent workers follow set_epoch through shared memory.
    loader = DataLoader(ds, batch_size=8, num_workers=1, persistent_workers=True)
    first = next(iter(loader))
    ds.set_epoch(1)
    second = next(iter(loader))
    assert torch.equal(first[0], torch.stack([d[0] for d in direct]))
    assert not torch.equal(first[0], second[0])
    assert torch.equal(second[0][5], ds[5][0])
    again = build_dataset(_cfg(), "train", train=True)
    again.set_epoch(1)
    assert torch.equal(again[5][1], second[1][5])
    other_seed = build_dataset(DataConfig(synthetic_size=49, crop_size=33, synthetic_train=8, seed=4), "train", True)
    assert not torch.equal(other_seed[0][0], direct[0][0])


def test_synthetic_scenes_are_deterministic_and_a_real_segmentation_problem():
    a, b = render(0, 5, 129, 6, "train"), render(0, 5, 129, 6, "train")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], render(0, 5, 129, 6, "val")[0])
    assert not np.array_equal(a[0], render(1, 5, 129, 6, "train")[0])
    masks = [render(0, i, 129, 6)[1] for i in range(40)]
    present = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=6)
    assert (present > 0).all() and present.max() < 0.9 * present.sum()  # every class, not all background
    # Objects at widely different scales: per-image class areas span more than 20x.
    areas = [np.bincount(m.ravel(), minlength=6)[1:] for m in masks]
    nonzero = np.concatenate([x[x > 0] for x in areas])
    assert nonzero.max() / nonzero.min() > 20
    image, mask = render(0, 0, 97, 12)
    assert image.shape == (97, 97, 3) and image.dtype == np.uint8 and mask.max() < 12
    with pytest.raises(ValueError, match="synthetic_classes"):
        render(0, 0, 33, 40)
