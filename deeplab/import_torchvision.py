"""Import torchvision weights (ImageNet ResNet or DeepLabV3) into this project's checkpoint format.

    python -m deeplab.import_torchvision resnet101-63fe2227.pth -o r101_imagenet.ckpt
    python -m deeplab.import_torchvision deeplabv3_resnet101_coco-586e9e4e.pth -o deeplabv3_r101.ckpt

A ResNet file becomes the backbone of the paper's model (head freshly initialized, ready to train); a
DeepLabV3 file becomes ``head="torchvision"`` at output stride 8 with torchvision's rates and atrous layout,
giving its outputs. Its auxiliary head (``aux_classifier.*``, an FCN on block3 used only as a training loss)
is dropped: this project neither trains nor exports it.
"""
from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError, read_weights_file, save_checkpoint
from .cli import command
from .config import BACKBONE_LAYERS, ModelConfig, add_config_args, config_from_args
from .model import build_model, load_backbone_weights

ARCHS = ("resnet50", "resnet101", "resnet152", "deeplabv3_resnet50", "deeplabv3_resnet101")


def _strip(state: dict) -> dict:
    for wrapper in ("state_dict", "model"):  # files saved as {"model": sd} by training scripts
        if isinstance(state.get(wrapper), dict) and not any(k.startswith(("conv1.", "backbone.")) for k in state):
            state = state[wrapper]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def detect_arch(state: dict) -> str:
    """Guess the architecture from the keys: units in block3 give the depth, ``classifier.*`` a DeepLabV3."""
    prefix = "backbone." if any(k.startswith("backbone.") for k in state) else ""
    keys = [k[len(prefix):] for k in state if k.startswith(prefix)]
    units = {k.split(".")[1] for k in keys if k.startswith("layer3.")}
    depth = {n[2]: name for name, n in BACKBONE_LAYERS.items() if name != "resnet_tiny"}.get(len(units))
    if depth is None or "conv1.weight" not in keys:
        raise ValueError("no torchvision ResNet keys found (conv1.weight, layer3.N...)")
    if prefix:
        return f"deeplabv3_{depth}"
    return depth


def import_state_dict(state: dict, arch: str | None = None, base: ModelConfig | None = None):
    """Return (model, ModelConfig, report) for a torchvision state dict."""
    state = _strip(state)
    arch = arch or detect_arch(state)
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r} is unknown; allowed: {', '.join(ARCHS)}")
    if arch.startswith("deeplabv3_"):
        num_classes = state["classifier.4.weight"].shape[0] if "classifier.4.weight" in state else 21
        cfg = ModelConfig(backbone=arch[len("deeplabv3_"):], num_classes=num_classes, output_stride=8,
                          multi_grid=(1, 1, 1), aspp_rates=(6, 12, 18), image_pooling=True, head="torchvision",
                          atrous_layout="torchvision")
        aux = sorted(k for k in state if k.startswith("aux_classifier."))
        state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
        model = build_model(cfg)
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
        if missing or unexpected or wrong:
            example = (missing or unexpected or wrong)[0]
            raise ValueError(f"does not match torchvision's {arch}: {len(missing)} missing, {len(unexpected)} "
                             f"unexpected, {len(wrong)} mismatched keys (e.g. {example})")
        model.load_state_dict(state)
        report = {"loaded": len(state), "missing": [], "unexpected": [], "dropped": aux}
    else:
        base = base or ModelConfig()
        cfg = ModelConfig(**{**base.__dict__, "backbone": arch})
        model = build_model(cfg)
        report = load_backbone_weights(model, state)
    return model, cfg, report


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deeplab.import_torchvision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="torchvision .pth (resnet50/101/152 ImageNet or deeplabv3_resnet50/101)")
    parser.add_argument("-o", "--output", required=True, help="checkpoint to write")
    parser.add_argument("--arch", choices=ARCHS, help="architecture (default: detected from the keys)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    state = read_weights_file(args.file)
    try:
        if not isinstance(state, dict):
            raise ValueError("not a state dict")
        model, model_cfg, report = import_state_dict(state, args.arch, cfg.model)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{args.file}: {e}") from None
    save_checkpoint(args.output, model, cfg.replace(model=model_cfg), imported_from=str(args.file))
    extra = [k for k in report["unexpected"] if not k.startswith("fc.")]
    print(f"imported {report['loaded']} tensors from {args.file} as {model_cfg.backbone} head={model_cfg.head} "
          f"OS{model_cfg.output_stride}; {len(report['missing'])} left at initialization"
          + (f"; ignored unexpected keys: {', '.join(extra[:5])}" if extra else "")
          + (f"; dropped torchvision's auxiliary head ({len(report['dropped'])} aux_classifier tensors: "
             "a training-only loss this project does not use)" if report.get("dropped") else ""))
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
