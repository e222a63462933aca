"""torchvision's own deeplabv3_mobilenet_v3_large as a recorded reference (tests/test_backbones.py).

The published weights cannot be downloaded here and torchvision is not a dependency, so its model was run once
with deterministic weights made from its key names and shapes (`weights` below), and its key layout and
logits were saved to REFERENCE. The test rebuilds the same weights from the recorded keys, imports them with
``python -m deeplab.import_torchvision`` and compares the logits. To record again (torchvision's pure-Python
models import beside the CPU torch once its C-op registrations are skipped):

    pip install --no-deps --target /tmp/tv torchvision==0.29.1
    PYTHONPATH=/tmp/tv:. python tests/mobilenet_reference.py
"""
import sys
import types
from pathlib import Path

import torch

REFERENCE = Path(__file__).parent / "data" / "deeplabv3_mobilenet_v3_large.pt"
SIZE = 49  # input side: stride 16 gives a 4x4 map, enough for every atrous branch to see padding and pixels


def weights(keys, shapes) -> dict:
    """Values that keep activations in range and make no layer an identity, the same on every machine."""
    gen = torch.Generator().manual_seed(22)
    state = {}
    for key, shape in zip(keys, shapes):
        shape = tuple(shape)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith(("running_mean", "bias")):
            state[key] = torch.randn(shape, generator=gen) * 0.1
        elif len(shape) == 1:  # BN scale
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            state[key] = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
    return state


def example_input() -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


def main() -> int:
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("skip")  # needs torchvision's C ops
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, aux_loss=True).eval()
    own = model.state_dict()
    keys, shapes = list(own), [list(v.shape) for v in own.values()]
    model.load_state_dict(weights(keys, shapes))
    with torch.no_grad():
        logits = model(example_input())["out"]
    REFERENCE.parent.mkdir(exist_ok=True)
    torch.save({"keys": keys, "shapes": shapes, "logits": logits,
                "num_params": sum(p.numel() for p in model.parameters())}, REFERENCE)
    print(REFERENCE, tuple(logits.shape), len(keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
