"""python -m export.predict MODEL IMAGE... -o DIR [--multi-scale] [--flip]

The same three PNGs per image as ``deeplab.predict`` (NAME.png class ids, NAME_color.png in the dataset's
palette, NAME_overlay.png), from an exported model: an ONNX file, an OpenVINO .xml IR or a TensorRT engine.
Class names and colours come from the file's metadata (the dataset it was trained for).
"""
from __future__ import annotations

import sys

from deeplab.cli import command
from deeplab.predict import names_and_palette, parse_args, predict_files

from .cli import show_progress
from .evaluate import EXPORTED_INFERENCE_ALIASES, MODEL_HELP, exported_options, exported_predictor


@command
def main(argv=None) -> int:
    args = parse_args(argv, "python -m export.predict", __doc__.split("\n\n")[1],
                      ("model", MODEL_HELP), EXPORTED_INFERENCE_ALIASES)
    show_progress()
    runner, exp, opts = exported_options(args)
    names, palette = names_and_palette(exp, runner.info.num_classes)
    return predict_files(exported_predictor(runner, opts), args.images, args.output, names, palette,
                         exp.inference.alpha)


if __name__ == "__main__":
    sys.exit(main())
