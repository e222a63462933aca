"""python -m deeplab.predict CKPT IMAGE... -o DIR [--output-stride 8] [--multi-scale] [--flip]

For each image (or every image in a folder) writes three PNGs into DIR:
  NAME.png          raw label map (grayscale, pixel value = class id)
  NAME_color.png    the label map in the dataset's palette (VOC palette, or a stable one), an indexed PNG
  NAME_overlay.png  class colours blended over the photo
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .config import ConfigError, add_config_args
from .evaluate import add_inference_args, inference_options, resolve_experiment
from .inference import Progress, predict_logits
from .palette import overlay, palette_bytes, voc_palette

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _expand(paths) -> list:
    """Files as given, folders as their images (sorted); a missing path is reported, not skipped silently."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def _save(image: Image.Image, path: Path) -> None:
    """Atomic: a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


PREDICTION_KINDS = ("labels", "color", "overlay")


def prediction_paths(out_dir: Path, name: str) -> dict:
    """Where the pictures of one image go: NAME.png, NAME_color.png, NAME_overlay.png."""
    out_dir = Path(out_dir)
    return {"labels": out_dir / f"{name}.png", "color": out_dir / f"{name}_color.png",
            "overlay": out_dir / f"{name}_overlay.png"}


def prediction_images(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5,
                      kinds=PREDICTION_KINDS) -> dict:
    """The pictures of one prediction as PIL images: raw class ids (L), palette colours (P), overlay (RGB)."""
    labels = labels.astype(np.uint8)
    out = {}
    if "labels" in kinds:
        out["labels"] = Image.fromarray(labels, mode="L")
    if "color" in kinds:
        out["color"] = Image.fromarray(labels, mode="P")
        out["color"].putpalette(palette_bytes(palette))
    if "overlay" in kinds:
        out["overlay"] = Image.fromarray(overlay(image, labels, palette, alpha))
    return out


def write_prediction(out_dir: Path, name: str, image: np.ndarray, labels: np.ndarray, palette: np.ndarray,
                     alpha: float = 0.5, kinds=PREDICTION_KINDS) -> dict:
    """The PNGs for one image (``kinds``: which of them); returns the paths of all three."""
    paths = prediction_paths(out_dir, name)
    for kind, picture in prediction_images(image, labels, palette, alpha, kinds).items():
        _save(picture, paths[kind])
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deeplab.predict", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a DeepLabv3 checkpoint (.ckpt)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the PNGs")
    add_inference_args(parser)
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours (0-1)")
    add_config_args(parser)
    args = parser.parse_args(argv)

    import torch

    from .checkpoint import CheckpointError, load_checkpoint
    from .data import DatasetError, dataset_info, normalize, read_image

    try:
        if not 0 <= args.alpha <= 1:
            raise ConfigError(f"--alpha {args.alpha}: must be between 0 and 1")
        opts = inference_options(args)
        ckpt = load_checkpoint(args.checkpoint)
        exp = resolve_experiment(ckpt, args)
        n = ckpt.config.num_classes
        try:
            info = dataset_info(exp.data)
        except DatasetError:
            info = None
        if info is not None and info.num_classes == n:
            names, palette = info.class_names, info.palette
        else:
            names, palette = [f"class_{i}" for i in range(n)], voc_palette(n)
        files = _expand(args.images)
        if not files:
            raise DatasetError(f"{', '.join(args.images)}: no images found")
    except (CheckpointError, DatasetError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = ckpt.model.eval()
    device = next(model.parameters()).device
    failures, used = 0, set()
    bar = Progress(len(files), "predict", enabled=len(files) > 1)
    for path in files:
        try:
            image = read_image(path)
        except DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            failures += 1
            bar.update()
            continue
        name = path.stem
        while name in used:  # same stem from two folders: keep both
            name += "_"
        used.add(name)
        with torch.no_grad():
            scores = predict_logits(model, normalize(image)[None].to(device), **opts)
        labels = scores.argmax(1)[0].cpu().numpy()
        paths = write_prediction(out_dir, name, image, labels, palette, args.alpha)
        counts = np.bincount(labels.ravel(), minlength=n)
        found = ", ".join(f"{names[k]} {100 * counts[k] / labels.size:.0f}%" for k in np.argsort(-counts)
                          if counts[k])
        bar.update()
        print(f"{path} -> {paths['overlay']} ({found})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
