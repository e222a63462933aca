"""Inference: multi-scale + flip average probabilities (Tables 4 and 6), sliding windows, output stride."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from deeplab import ConfusionMatrix, ModelConfig, build_model
from deeplab.inference import PAPER_SCALES, evaluate, model_predictor, predict_logits, scaled_size

pytestmark = pytest.mark.usefixtures("one_thread")


class LeftRight(nn.Module):
    """Known, asymmetric response: class 1 on the left of whatever it sees, class 0 on the right
    (logit = +-3 times the normalized column position). Records the input sizes it was given."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.sizes = []

    def forward(self, x):
        n, _, h, w = x.shape
        self.sizes.append((h, w))
        pos = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(n, 1, h, w)
        return torch.cat([3 * pos, -3 * pos], 1) * self.w


class BySize(nn.Module):
    """A constant answer that depends only on the input height: logits (0, 20) at full size, (3, 0) else."""

    def forward(self, x):
        n, _, h, w = x.shape
        logits = torch.tensor([0.0, 20.0]) if h == 65 else torch.tensor([3.0, 0.0])
        return logits.view(1, 2, 1, 1).expand(n, 2, h, w).clone()


class Pointwise(nn.Module):
    """A 1x1 convolution: no context, so tiling and flipping cannot change its answer."""

    def __init__(self, classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return self.conv(x)


def test_flip_averages_probabilities_of_the_mirrored_response():
    model = LeftRight()
    x = torch.randn(2, 3, 9, 11)
    probs = predict_logits(model, x, flip=True).softmax(1)
    p = model(x).softmax(1)
    torch.testing.assert_close(probs, (p + p.flip(-1)) / 2)
    torch.testing.assert_close(probs, probs.flip(-1))  # the averaged answer is mirror-symmetric
    torch.testing.assert_close(probs, torch.full_like(probs, 0.5))  # left and right cancel exactly here
    assert model.sizes == [(9, 11), (9, 11), (9, 11)]


def test_multi_scale_averages_probabilities_not_logits():
    x = torch.randn(1, 3, 65, 65)
    probs = predict_logits(BySize(), x, scales=(0.5, 1.0, 1.5)).softmax(1)
    p_full = torch.tensor([0.0, 20.0]).softmax(0)
    p_other = torch.tensor([3.0, 0.0]).softmax(0)
    expected = (p_full + 2 * p_other) / 3
    torch.testing.assert_close(probs[0, :, 30, 30], expected)
    assert probs.argmax(1).eq(0).all()  # probability average picks class 0 ...
    assert (torch.tensor([0.0, 20.0]) + 2 * torch.tensor([3.0, 0.0])).argmax() == 1  # ... a logit average 1


def test_multi_scale_and_flip_run_every_scale_on_the_paper_grid():
    model = LeftRight()
    x = torch.randn(1, 3, 33, 41)
    probs = predict_logits(model, x, scales=PAPER_SCALES, flip=True).softmax(1)
    expected_sizes = [(scaled_size(33, s), scaled_size(41, s)) for s in PAPER_SCALES for _ in (0, 1)]
    assert model.sizes == expected_sizes
    assert probs.shape == (1, 2, 33, 41)
    torch.testing.assert_close(probs, probs.flip(-1))
    assert scaled_size(513, 0.5) == 257 and scaled_size(513, 1.75) == 897


def test_sliding_windows_cover_the_image_and_match_a_context_free_model():
    model = Pointwise()
    x = torch.randn(1, 3, 100, 130)
    whole = model(x).softmax(1)
    tiled = predict_logits(model, x, window=40).softmax(1)
    torch.testing.assert_close(tiled, whole)
    torch.testing.assert_close(predict_logits(model, x, flip=True, window=48).softmax(1), whole)
    # With scales too: resizing a pointwise answer is exact only where the image is smooth; compare loosely.
    smooth = torch.nn.functional.interpolate(torch.randn(1, 3, 10, 13), size=(100, 130), mode="bilinear")
    ms = predict_logits(model, smooth, scales=(1.0, 1.5), flip=True, window=48).softmax(1)
    assert (ms.argmax(1) == model(smooth).argmax(1)).float().mean() > 0.97
    lr = LeftRight()
    predict_logits(lr, torch.randn(1, 3, 50, 100), window=(50, 40))
    assert lr.sizes == [(50, 40)] * 4  # columns 0, 27, 54, 60: four windows with 1/3 overlap


def test_output_stride_is_switched_and_restored():
    model = build_model(ModelConfig(backbone="resnet_tiny", num_classes=3, aspp_channels=16)).eval()
    x = torch.randn(1, 3, 65, 65)
    got = predict_logits(model, x, output_stride=8)
    assert model.output_stride == 16
    with torch.no_grad():
        expected = model.set_output_stride(8)(x)
    torch.testing.assert_close(got, expected)


def test_evaluate_matches_a_plain_loop_and_restores_train_mode():
    model = build_model(ModelConfig(backbone="resnet_tiny", num_classes=3, aspp_channels=16))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, 33, 33, generator=g), torch.randint(0, 3, (33, 33), generator=g)) for _ in range(4)]
    for _, m in data:
        m[:3] = 255
    loader = DataLoader(data, batch_size=2)
    model.train()
    seen = []
    cm = evaluate(model_predictor(model, output_stride=8, flip=True), loader, 3, progress=seen.append)
    assert model.training and model.output_stride == 16 and seen == [2, 2]
    model.eval()
    ref = ConfusionMatrix(3)
    with torch.no_grad():
        model.set_output_stride(8)
        for images, masks in loader:
            p = model(images).softmax(1)
            p = (p + model(images.flip(-1)).softmax(1).flip(-1)) / 2
            ref.update(p.argmax(1), masks)
    assert torch.equal(cm.mat, ref.mat) and cm.mat.sum() == 4 * 30 * 33
    assert not math.isnan(cm.miou())


def test_inference_flags_are_the_inference_section_checked_once():
    """--scales/--multi-scale/--flip/--window/--alpha set the inference section through --set's path, so a
    bad value is one line naming the flag, whichever command took it."""
    import argparse

    from deeplab.config import ALPHA_ALIAS, INFERENCE_ALIASES, ConfigError, add_config_args, config_from_args

    parser = argparse.ArgumentParser()
    add_config_args(parser, aliases=INFERENCE_ALIASES + [ALPHA_ALIAS])
    for argv, words in ((["--scales", "1.0", "0"], "--scales 1.0 0: inference.scales=[1.0, 0] must be one or "
                                                   "more scales > 0"),
                        (["--window", "8"], "--window 8: inference.window=8 must be at least 16 pixels"),
                        (["--alpha", "2"], "--alpha 2: inference.alpha=2 must be between 0 and 1"),
                        (["--output-stride", "12"], "--output-stride 12: inference.output_stride=12 is not allowed")):
        with pytest.raises(ConfigError) as info:
            config_from_args(parser.parse_args(argv))
        assert str(info.value).startswith(words) and "\n" not in str(info.value)
    opts = config_from_args(parser.parse_args(["--multi-scale", "--flip", "--output-stride", "8"])).inference
    assert opts.options() == {"output_stride": 8, "scales": PAPER_SCALES, "flip": True, "window": None}


def test_evaluate_takes_any_backend_returning_numpy_logits():
    """export's runners return numpy arrays: the same evaluator, the same matrix as the torch path."""
    model = Pointwise(classes=3)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(2, 3, 9, 9, generator=g), torch.randint(0, 3, (2, 9, 9), generator=g)) for _ in range(3)]
    with torch.no_grad():
        numpy_cm = evaluate(lambda x: model(x).numpy(), data, 3)
    torch_cm = evaluate(model_predictor(model), data, 3)
    assert torch.equal(numpy_cm.mat, torch_cm.mat) and int(numpy_cm.mat.sum()) == 3 * 2 * 81
