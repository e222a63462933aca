"""Import torchvision weights (an ImageNet classifier or a DeepLabV3) into this project's checkpoint format.

    python -m deeplab.import_torchvision resnet101-63fe2227.pth -o r101_imagenet.ckpt
    python -m deeplab.import_torchvision deeplabv3_resnet101_coco-586e9e4e.pth -o deeplabv3_r101.ckpt
    python -m deeplab.import_torchvision deeplabv3_mobilenet_v3_large-fc3c493d.pth -o m.ckpt

A classifier file (resnet50/101/152, mobilenet_v3_large) becomes the backbone of the paper's model (head
freshly initialized, ready to train); a DeepLabV3 file becomes ``head="torchvision"`` with torchvision's rates
and atrous layout (ResNet at output stride 8, MobileNetV3 at 16), giving its outputs. The architectures are
those the backbones register (`deeplab.backbones`). Its auxiliary head (``aux_classifier.*``, an FCN on block3
used only as a training loss) is dropped: this project neither trains nor exports it.
"""
from __future__ import annotations

import argparse
import sys

from .backbones import backbone_class, torchvision_archs
from .checkpoint import CheckpointError, read_weights_file, save_checkpoint
from .cli import command
from .config import ModelConfig, add_config_args, config_from_args
from .model import build_model, load_backbone_weights

ARCHS = tuple(torchvision_archs())


def _strip(state: dict) -> dict:
    for wrapper in ("state_dict", "model"):  # files saved as {"model": sd} by training scripts
        if isinstance(state.get(wrapper), dict) and not any(k.startswith(("conv1.", "features.", "backbone."))
                                                            for k in state):
            state = state[wrapper]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def detect_arch(state: dict) -> str:
    """The architecture whose backbone keys the file holds (``backbone.*`` and ``classifier.*``: a DeepLabV3)."""
    deeplab = any(k.startswith("backbone.") for k in state)
    for arch, (name, fields) in torchvision_archs().items():
        if (fields is not None) != deeplab:
            continue
        cls = backbone_class(name)
        keys = {k[len("backbone."):] for k in state if k.startswith("backbone.")} if deeplab \
            else set(cls.from_torchvision(state))
        if cls.matches_torchvision(keys, name):
            return arch
    raise ValueError("no torchvision backbone keys found (ResNet's conv1.weight, layer3.N..., MobileNetV3's "
                     "features.N...)")


def _import_deeplab(state: dict, arch: str, name: str, fields: dict):
    """A whole torchvision DeepLabV3: every key must match; its auxiliary head is dropped."""
    num_classes = state["classifier.4.weight"].shape[0] if "classifier.4.weight" in state else 21
    cfg = ModelConfig(backbone=name, num_classes=num_classes, **fields)
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
    return model, cfg, {"loaded": len(state), "missing": [], "unexpected": [], "dropped": aux}


def import_state_dict(state: dict, arch: str | None = None, base: ModelConfig | None = None):
    """Return (model, ModelConfig, report) for a torchvision state dict."""
    state = _strip(state)
    arch = arch or detect_arch(state)
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r} is unknown; allowed: {', '.join(ARCHS)}")
    name, fields = torchvision_archs()[arch]
    if fields is not None:
        return _import_deeplab(state, arch, name, dict(fields))
    base = base or ModelConfig()
    cfg = ModelConfig(**{**base.__dict__, "backbone": name})
    model = build_model(cfg)
    return model, cfg, load_backbone_weights(model, state)


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deeplab.import_torchvision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="torchvision .pth (an ImageNet classifier or a DeepLabV3: see --arch)")
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
    extra = [k for k in report["unexpected"] if not k.startswith(("fc.", "classifier."))]  # ImageNet heads
    print(f"imported {report['loaded']} tensors from {args.file} as {model_cfg.backbone} head={model_cfg.head} "
          f"OS{model_cfg.output_stride}; {len(report['missing'])} left at initialization"
          + (f"; ignored unexpected keys: {', '.join(extra[:5])}" if extra else "")
          + (f"; dropped torchvision's auxiliary head ({len(report['dropped'])} aux_classifier tensors: "
             "a training-only loss this project does not use)" if report.get("dropped") else ""))
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
