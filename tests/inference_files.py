"""Files for the batch-inference and serving tests: a tiny checkpoint whose predictions vary across the image,
a folder of real PNG/JPEG photos of mixed sizes in nested folders (plus a truncated JPEG and a text file),
and `deeplab.predict`'s outputs for them as the reference."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_trees import blocks, photo_for
from deeplab.palette import voc_palette

# (height, width): repeated sizes share a model call, the odd ones run alone
SIZES = [(40, 56), (33, 33), (57, 41), (40, 56), (64, 64), (33, 33), (48, 80)]
BAD = {"broken/half.jpg": "truncated", "notes.txt": "not an image"}


def tiny_checkpoint(path: Path, num_classes: int = 5, seed: int = 0) -> Path:
    """resnet_tiny with random BatchNorm affine parameters: an untrained model whose label maps still have
    several classes and follow the image, so pixel-for-pixel comparisons can fail."""
    from deeplab import build_model, save_checkpoint
    from deeplab.config import ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="resnet_tiny", num_classes=num_classes, aspp_channels=16)
    model = build_model(cfg).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.5)
    return save_checkpoint(path, model, cfg)


def photo(size, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return photo_for(blocks(rng, *size, labels=np.arange(6), block=8), rng, voc_palette(8))


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def image_collection(root: Path, count: int = 20) -> list:
    """``count`` photos under root (top level and two nested folders, PNG and JPEG, unique stems) plus the
    BAD files; returns the good ones' relative paths."""
    good = []
    for i in range(count):
        folder = ("", "city_a", "city_a/day2")[i % 3]
        rel = f"{folder}/img{i:02d}.{'png' if i % 2 else 'jpg'}".lstrip("/")
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = photo(SIZES[i % len(SIZES)], seed=i)
        if rel.endswith(".png"):
            Image.fromarray(image).save(path)
        else:
            path.write_bytes(jpeg_bytes(image))
        good.append(rel)
    (root / "broken").mkdir(exist_ok=True)
    whole = jpeg_bytes(photo((64, 64), seed=99))
    (root / "broken" / "half.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "notes.txt").write_text("camera notes, not a picture\n")
    return good


def reference_predictions(ckpt: Path, root: Path, rels: list, out: Path) -> Path:
    """deeplab.predict over the good images (unique stems, so its flat NAME.png names are unambiguous)."""
    from deeplab import predict

    code = predict.main([str(ckpt), *[str(root / r) for r in rels], "-o", str(out)])
    assert code == 0
    return out


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)
