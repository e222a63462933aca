"""Each reader on a small tree written in the real layout (real JPEGs and palette PNGs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_trees import make_ade20k, make_cityscapes, make_folder, make_voc
from deeplab.config import DataConfig
from deeplab.data import DatasetError, build_dataset, dataset_info, denormalize, detect_format


def _mask(ds, i):
    return ds[i][1].numpy()


def test_voc_reads_palette_pngs_and_jpegs(tmp_path):
    masks = make_voc(tmp_path)
    cfg = DataConfig(dataset="voc", root=str(tmp_path))
    ds = build_dataset(cfg, "val", train=False)
    assert len(ds) == 1
    image, mask = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 40, 56)
    assert mask.dtype == torch.int64
    np.testing.assert_array_equal(mask.numpy(), masks["2007_000033"])  # palette indices, 255 border kept
    # The image is the right partner: its colours follow the mask (JPEG is lossy: compare loosely).
    palette = dataset_info(cfg).palette
    m = masks["2007_000033"]
    expected = np.where(m[..., None] == 255, np.array([224, 224, 192]), palette[np.minimum(m, 20)])
    assert np.abs(denormalize(image).astype(int) - expected).mean() < 12
    train = build_dataset(DataConfig(dataset="voc", root=str(tmp_path / "VOCdevkit" / "VOC2012"), crop_size=33),
                          "train", train=True)
    assert len(train) == 2 and train[1][0].shape == (3, 33, 33)


def test_voc_train_aug_is_sbd_plus_train_minus_val(tmp_path):
    masks = make_voc(tmp_path, train=("a1", "a2"), val=("v1",), aug_only=("s1", "s2"), sbd=True)
    ds = build_dataset(DataConfig(dataset="voc", root=str(tmp_path)), "train_aug", train=False)
    names = sorted(p[0].split("/")[-1] for p in ds.pairs)
    assert names == ["a1.jpg", "a2.jpg", "s1.jpg", "s2.jpg"]  # v1 has an SBD mask but is VOC val
    assert all("SegmentationClassAug" in p[1] for p in ds.pairs)
    np.testing.assert_array_equal(_mask(ds, 2), masks["s1"])


def test_voc_train_aug_list_overlapping_val_is_refused(tmp_path):
    make_voc(tmp_path, train=("a1",), val=("v1",), sbd=True, train_aug_list=("a1", "v1"))
    with pytest.raises(DatasetError, match=r"train_aug\.txt: 1 ids are also in val\.txt \(e\.g\. v1\)"):
        build_dataset(DataConfig(dataset="voc", root=str(tmp_path)), "train_aug", train=True)


def test_voc_train_aug_list_in_deeplab_line_format(tmp_path):
    make_voc(tmp_path, train=("a1", "a2"), val=("v1",), sbd=True)
    lists = tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    (lists / "train_aug.txt").write_text("/JPEGImages/a2.jpg /SegmentationClassAug/a2.png\n")
    ds = build_dataset(DataConfig(dataset="voc", root=str(tmp_path)), "train_aug", train=False)
    assert [p[0].split("/")[-1] for p in ds.pairs] == ["a2.jpg"]


def test_cityscapes_label_ids_become_train_ids(tmp_path):
    label_ids = make_cityscapes(tmp_path)
    # cityscapesScripts labels.py, written out here independently of the reader's table
    official = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    cfg = DataConfig(dataset="cityscapes", root=str(tmp_path))
    ds = build_dataset(cfg, "train", train=False)
    assert len(ds) == 2
    for i, stem in enumerate(sorted(label_ids)):
        raw = label_ids[stem]
        expected = np.vectorize(lambda v: official.get(int(v), 255))(raw)
        np.testing.assert_array_equal(_mask(ds, i), expected)
    info = dataset_info(cfg)
    assert info.num_classes == 19 and info.class_names[13] == "car" and tuple(info.palette[0]) == (128, 64, 128)


def test_ade20k_shifts_labels_and_ignores_other(tmp_path):
    masks = make_ade20k(tmp_path)
    for split, prefix in (("train", "ADE_train"), ("val", "ADE_val")):
        ds = build_dataset(DataConfig(dataset="ade20k", root=str(tmp_path)), split, train=False)
        raw = masks[f"{prefix}_00000001"]
        expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
        np.testing.assert_array_equal(_mask(ds, 0), expected)
    info = dataset_info(DataConfig(dataset="ade20k"))
    assert info.num_classes == 150 and info.class_names[0] == "wall" and info.class_names[-1] == "flag"


def test_folder_with_split_lists_and_class_names(tmp_path):
    masks = make_folder(tmp_path, splits={"train": ["a", "b"], "val": ["c"]})
    cfg = DataConfig(dataset="folder", root=str(tmp_path))
    info = dataset_info(cfg)
    assert info.class_names == ["bg", "cat", "dog"] and info.palette.shape == (3, 3)
    train = build_dataset(cfg, "train", train=False)
    assert len(train) == 2
    np.testing.assert_array_equal(_mask(train, 1), masks["b"])  # b is a PNG image with a palette mask
    val = build_dataset(cfg, "val", train=False)
    np.testing.assert_array_equal(_mask(val, 0), masks["c"])


def test_folder_without_class_names_needs_num_classes(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(DatasetError, match="classes.txt: not found"):
        dataset_info(DataConfig(dataset="folder", root=str(tmp_path)))
    assert dataset_info(DataConfig(dataset="folder", root=str(tmp_path), num_classes=3)).num_classes == 3


def test_detect_format(tmp_path):
    make_voc(tmp_path / "v")
    make_cityscapes(tmp_path / "c")
    make_ade20k(tmp_path / "a")
    make_folder(tmp_path / "f")
    assert [detect_format(tmp_path / k) for k in "vcaf"] == ["voc", "cityscapes", "ade20k", "folder"]
    with pytest.raises(DatasetError, match="cannot tell"):
        detect_format(tmp_path)


def test_missing_partner_refused_at_build_time(tmp_path):
    make_voc(tmp_path)
    gone = tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000039.png"
    gone.unlink()
    with pytest.raises(DatasetError) as e:
        build_dataset(DataConfig(dataset="voc", root=str(tmp_path)), "train", train=True)
    assert str(gone) in str(e.value) and "\n" not in str(e.value) and "deeplab.data check" in str(e.value)


def test_bad_file_in_a_loader_worker_is_one_line_naming_it(tmp_path):
    make_voc(tmp_path)
    bad = tmp_path / "VOCdevkit/VOC2012/JPEGImages/2007_000039.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated JPEG
    ds = build_dataset(DataConfig(dataset="voc", root=str(tmp_path), crop_size=33), "train", train=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    with pytest.raises(DatasetError) as e:
        next(iter(loader))
    msg = str(e.value)
    assert msg.startswith(str(bad)) and "truncated" in msg and "\n" not in msg


def test_bootstrapping_repeats_images_with_hard_classes(tmp_path):
    masks = make_folder(tmp_path, names=[f"c{i}" for i in range(30)], stems=[f"s{i}" for i in range(6)])
    hard = 7
    holding = sum(int((m == hard).any()) for m in masks.values())
    assert 0 < holding < 6
    cfg = DataConfig(dataset="folder", root=str(tmp_path), crop_size=17, bootstrap_classes=(hard,),
                     bootstrap_repeat=3)
    ds = build_dataset(cfg, "train", train=True)
    assert len(ds) == 6 + 2 * holding
    # The repeated copies are the images that hold the class, and each copy gets its own augmentation.
    repeated = [i for i in set(ds.indices) if ds.indices.count(i) == 3]
    assert sorted(ds.pairs[i][1].split("/")[-1] for i in repeated) == \
        sorted(f"{s}.png" for s, m in masks.items() if (m == hard).any())
    a, b = [p for p, i in enumerate(ds.indices) if i == repeated[0]][:2]
    assert not torch.equal(ds[a][0], ds[b][0])
