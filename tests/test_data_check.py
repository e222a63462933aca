"""`python -m deeplab.data check` finds each planted defect and names its file; a clean tree passes."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from data_trees import make_cityscapes, make_voc, save_jpeg, save_png
from deeplab.data.__main__ import main

IDS = ("2007_000032", "2007_000039", "2007_000042", "2007_000061", "2007_000063", "2007_000068", "2007_000121")


def _run(capsys, *args):
    code = main(["check", *args])
    out = capsys.readouterr()
    return code, out.out


def test_clean_voc_tree_passes_with_histogram(tmp_path, capsys):
    masks = make_voc(tmp_path, train=IDS[:3])
    code, out = _run(capsys, "--format", "voc", "--root", str(tmp_path), "--split", "train")
    assert code == 0, out
    assert "3 image/mask pairs, 0 problem(s)" in out
    # The histogram counts every pixel of every class, checked against the masks written.
    totals = np.bincount(np.concatenate([masks[i].ravel() for i in IDS[:3]]), minlength=256)
    row = next(line for line in out.splitlines() if line.split()[:2] == ["15", "person"])
    assert int(row.split()[2].replace(",", "")) == totals[15]
    row = next(line for line in out.splitlines() if "(ignore)" in line)
    assert int(row.split()[2].replace(",", "")) == totals[255]


def test_every_planted_defect_is_named(tmp_path, capsys, monkeypatch):
    make_voc(tmp_path, train=IDS)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    jpg = lambda i: voc / "JPEGImages" / f"{i}.jpg"  # noqa: E731
    png = lambda i: voc / "SegmentationClass" / f"{i}.png"  # noqa: E731
    planted = {}
    png(IDS[0]).unlink()
    planted[png(IDS[0])] = "missing mask"
    jpg(IDS[1]).write_bytes(jpg(IDS[1]).read_bytes()[:400])
    planted[jpg(IDS[1])] = "truncated"
    save_png(png(IDS[2]), np.zeros((20, 20), np.uint8), palette=True)
    planted[png(IDS[2])] = "mask is 20x20 but its image"
    bad_labels = np.zeros((40, 56), np.uint8)
    bad_labels[5, 5], bad_labels[6, 6] = 30, 77
    save_png(png(IDS[3]), bad_labels, palette=True)
    planted[png(IDS[3])] = "label values 30, 77 are not class ids 0-20 or 255"
    save_png(png(IDS[4]), np.zeros((40, 56, 3), np.uint8))
    planted[png(IDS[4])] = "mask is an RGB image"
    save_jpeg(jpg(IDS[5]), np.zeros((150, 150, 3), np.uint8))  # 22,500 pixels: over the limit set below
    planted[jpg(IDS[5])] = "decompression-bomb limit"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    code, out = _run(capsys, "--format", "voc", "--root", str(tmp_path), "--split", "train", "--workers", "2")
    assert code == 1
    lines = out.splitlines()
    for path, reason in planted.items():
        hits = [line for line in lines if line.startswith(f"{path}:")]
        assert len(hits) == 1 and reason in hits[0], (path, reason, out)
    assert "6 problem(s)" in out
    assert not any(line.startswith(str(jpg(IDS[6]))) for line in lines)  # the good image is not blamed


def test_empty_split_fails(tmp_path, capsys):
    make_voc(tmp_path)
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").write_text("")
    code, out = _run(capsys, "--format", "voc", "--root", str(tmp_path), "--split", "val")
    assert code == 1 and "has no image/mask pairs" in out


def test_cityscapes_invalid_label_id_and_cli_exit_status(tmp_path):
    make_cityscapes(tmp_path)
    mask_path = sorted((tmp_path / "gtFine" / "train").glob("*/*_labelIds.png"))[0]
    ids = np.asarray(Image.open(mask_path)).copy()
    ids[0, 0] = 40
    save_png(mask_path, ids)
    proc = subprocess.run([sys.executable, "-m", "deeplab.data", "check", "--format", "cityscapes", "--root",
                           str(tmp_path), "--split", "train"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"{mask_path}: label values 40 are not Cityscapes labelIds 0-33" in proc.stdout.splitlines()


def test_missing_root_is_one_line_error(tmp_path, capsys):
    code = main(["check", "--root", str(tmp_path / "nope"), "--format", "voc"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0
    assert err == f"error: --root {tmp_path / 'nope'}: data.root={tmp_path / 'nope'}: dataset folder not found\n"


def test_a_split_that_does_not_exist_names_those_that_do(tmp_path, capsys):
    """`--split trian` on a folder dataset with splits used to mean every image (rc 0)."""
    from data_trees import make_folder

    root = tmp_path / "ds"
    make_folder(root, splits={"train": ["a", "b"], "val": ["c"]})
    assert main(["check", "--format", "folder", "--root", str(root), "--split", "train"]) == 0
    capsys.readouterr()
    assert main(["check", "--format", "folder", "--root", str(root), "--split", "trian"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {root}: split 'trian' does not exist; splits here: train, val"]
    flat = tmp_path / "flat"
    make_folder(flat)
    assert main(["check", "--format", "folder", "--root", str(flat), "--split", "val"]) == 0
    capsys.readouterr()
    assert main(["check", "--format", "folder", "--root", str(flat), "--split", "trian"]) != 0
    assert "no split folders or lists" in capsys.readouterr().err
