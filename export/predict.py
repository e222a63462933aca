"""python -m export.predict MODEL IMAGE... -o DIR [--multi-scale] [--flip]

The same three PNGs per image as ``deeplab.predict`` (NAME.png class ids, NAME_color.png in the dataset's
palette, NAME_overlay.png), from an exported model: an ONNX file, an OpenVINO .xml IR or a TensorRT engine.
Class names and colours come from the file's metadata (the dataset it was trained for).
"""
from __future__ import annotations

import argparse
import sys

from deeplab.cli import command
from deeplab.config import ConfigError, add_config_args
from deeplab.evaluate import add_inference_args, resolve_experiment
from deeplab.predict import names_and_palette, predict_files

from .cli import show_progress
from .evaluate import ENGINE_HINT, exported_options, exported_predictor, model_experiment, open_exported


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.predict", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help=f"an exported model: .onnx, OpenVINO .xml, or {ENGINE_HINT}")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the PNGs")
    add_inference_args(parser)
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours (0-1)")
    add_config_args(parser)
    return parser.parse_args(argv)


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0 <= args.alpha <= 1:
        raise ConfigError(f"--alpha {args.alpha}: must be between 0 and 1")
    show_progress()
    runner, meta, _ = open_exported(args.model)
    opts = exported_options(args, meta, args.model)
    names, palette = names_and_palette(resolve_experiment(model_experiment(meta), args), int(meta["num_classes"]))
    return predict_files(exported_predictor(runner, opts), args.images, args.output, names, palette, args.alpha)


if __name__ == "__main__":
    sys.exit(main())
