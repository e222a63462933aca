"""python -m deeplab.predict CKPT IMAGE... -o DIR [--output-stride 8] [--multi-scale] [--flip]

For each image (or every image in a folder) writes three PNGs into DIR:
  NAME.png          raw label map (grayscale, pixel value = class id)
  NAME_color.png    the label map in the dataset's palette (VOC palette, or a stable one), an indexed PNG
  NAME_overlay.png  class colours blended over the photo
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .cli import command, on_interrupt, stops_held
from .config import ALPHA_ALIAS, INFERENCE_ALIASES, add_config_args
from .data import DatasetError, read_image
from .fileio import atomic_path, ensure_dir
from .palette import overlay, palette_bytes, voc_palette
from .progress import Progress

# torch (the checkpoint, the model, normalize to a tensor) is imported where it is used: segment's actors and
# serve's replicas write their PNGs with prediction_paths / write_prediction and must not load it.
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
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


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


def names_and_palette(exp, num_classes: int) -> tuple:
    """Class names and colours of the experiment's dataset when it has the model's classes, else generic."""
    from .data import dataset_info

    try:
        info = dataset_info(exp.data)
    except DatasetError:
        info = None
    if info is not None and info.num_classes == num_classes:
        return info.class_names, info.palette
    return [f"class_{i}" for i in range(num_classes)], voc_palette(num_classes)


def _say_written(written: int, total: int, out_dir) -> None:
    on_interrupt(f"the PNGs of {written} of {total} images are in {out_dir} (each file whole); the same command "
                 "writes them all again")


def predict_files(predict, images, output, names, palette, alpha: float = 0.5) -> int:
    """The PNGs of every image (files, or folders of them) into the folder `output`, with a progress bar and a
    line per image; an unreadable image is one error line and the exit code 1, the others are still written."""
    from .data import normalize

    files = _expand(images)
    if not files:
        raise DatasetError(f"{', '.join(images)}: no images found")
    out_dir = ensure_dir(output)
    failures, written, used = 0, 0, set()
    bar = Progress(len(files), "predict", enabled=len(files) > 1)
    _say_written(written, len(files), out_dir)
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
        labels = predict(normalize(image)[None]).argmax(1)[0].cpu().numpy()
        with stops_held():  # the stop line counts exactly the files written
            paths = write_prediction(out_dir, name, image, labels, palette, alpha)
            written += 1
            _say_written(written, len(files), out_dir)
        counts = np.bincount(labels.ravel(), minlength=len(names))
        found = ", ".join(f"{names[k]} {100 * counts[k] / labels.size:.0f}%" for k in np.argsort(-counts)
                          if counts[k])
        bar.update()
        print(f"{path} -> {paths['overlay']} ({found})")
    return 1 if failures else 0



def parse_args(argv=None, prog: str = "python -m deeplab.predict", description: str = __doc__.split("\n\n")[1],
               model=("checkpoint", "a DeepLabv3 checkpoint (.ckpt)"), inference_aliases=INFERENCE_ALIASES
               ) -> argparse.Namespace:
    """The predict command's arguments; ``model`` (name, help) is what it predicts with (export.predict: a file,
    with its own ``inference_aliases``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(model[0], help=model[1])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the PNGs")
    add_config_args(parser, aliases=inference_aliases + [ALPHA_ALIAS])
    return parser.parse_args(argv)


@command
def main(argv=None) -> int:
    from .checkpoint import load_checkpoint
    from .evaluate import resolve_experiment
    from .inference import model_predictor

    args = parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    exp = resolve_experiment(ckpt.experiment, args)
    predict = model_predictor(ckpt.model, **exp.inference.options())
    names, palette = names_and_palette(exp, ckpt.config.num_classes)
    return predict_files(predict, args.images, args.output, names, palette, exp.inference.alpha)


if __name__ == "__main__":
    sys.exit(main())
