"""The paper's protocol to the last detail (issue 11), one test per point:

1. frozen BatchNorm stays frozen through evaluations and resume  -> test_frozen_bn_stays_frozen_*
2. exact resume includes the fp16 GradScaler                    -> test_resume_restores_the_grad_scaler
3. weight decay on convolution weights only                      -> test_weight_decay_on_conv_weights_only
4. the paper's BN decay by default, a warning for short runs     -> test_paper_bn_decay_by_default_*
5. model.align_corners (513 = 16k + 1)                           -> test_align_corners_* (ONNX: test_onnx_parity_*)
6. one image per worker where BatchNorm still sees a batch       -> test_one_image_per_worker_*
7. Table 1's output strides 64-256 with cascaded blocks          -> test_table1_strides_*
(8, the console, is tests/test_console.py.)
Issue 18 (OS switch as an exact densification: tests/test_densify.py):
9. the cascade-only head of Tables 1-3 (model.aspp: false), OS 4-256 -> test_cascade_only_*
10. the VOC stage configs: eval crop 513, stage 2 bootstraps         -> test_voc_stage_configs_*
"""
import datetime
import multiprocessing
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import cluster  # noqa: F401  (the cluster section: these configs set it, its checks are tested here)
import tuning  # noqa: F401  (the tune section of the shipped configs)
from deeplab import ModelConfig, build_model, load_checkpoint, save_checkpoint
from deeplab.checkpoint import CHECKPOINT_FILE
from deeplab.config import ConfigError, TrainConfig, load_config
from deeplab.inference import evaluate, model_predictor
from deeplab.model import block_layout
from deeplab.train_loop import Worker, train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(*extra):
    """resnet_tiny on 65 px synthetic crops, one worker: behaviour, not accuracy."""
    return load_config(None, [
        "model.backbone=resnet_tiny", "model.aspp_channels=16", "model.num_classes=4",
        "data.synthetic_classes=4", "data.synthetic_size=80", "data.crop_size=65", "data.synthetic_train=8",
        "data.synthetic_val=2", "data.loader_workers=0", "train.batch_size=2", "train.max_iterations=4",
        "train.eval_interval=1", "train.log_interval=100", "train.lr=0.01", "train.amp=off",
        "train.bn_momentum=0.5", "cluster.num_workers=1", *extra])


class Keep:
    """A runner's report(): every checkpoint copied to a folder, by iteration."""

    def __init__(self, folder):
        self.folder, self.paths = folder, {}
        os.makedirs(folder, exist_ok=True)

    def __call__(self, metrics, checkpoint_dir):
        if checkpoint_dir:
            path = os.path.join(self.folder, f"it{metrics['iteration']}.ckpt")
            with open(os.path.join(checkpoint_dir, CHECKPOINT_FILE), "rb") as src, open(path, "wb") as out:
                out.write(src.read())
            self.paths[metrics["iteration"]] = path


# ---------------------------------------------------------------------------------------------------------
# 1. Frozen BN


def test_frozen_bn_stays_frozen_through_evaluations_and_resume(tmp_path):
    """Train with freeze_bn, evaluating after every step, then resume mid-run and train on: every BatchNorm's
    running statistics and affine parameters stay those of the starting checkpoint, bit for bit."""
    start = tmp_path / "stage1.ckpt"
    torch.manual_seed(3)
    stage1 = build_model(tiny().model)
    for m in stage1.modules():  # statistics and affine values that differ from a fresh BN's
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    save_checkpoint(start, stage1, tiny().model)
    cfg = tiny("train.freeze_bn=true", f"train.init_from={start}")
    full = Keep(tmp_path / "full")
    train(cfg, Worker(report=full))
    resumed = Keep(tmp_path / "resumed")
    train(cfg, Worker(report=resumed, latest_checkpoint=lambda: full.paths[2]))
    expected = {n: m for n, m in load_checkpoint(start).model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(expected) > 10
    for path in [*full.paths.values(), resumed.paths[4]]:
        model = load_checkpoint(path).model
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                for leaf in ("weight", "bias", "running_mean", "running_var"):
                    assert torch.equal(getattr(m, leaf), getattr(expected[name], leaf)), (path, name, leaf)
    trained, before = load_checkpoint(full.paths[4]).model, load_checkpoint(start).model
    assert not torch.equal(trained.backbone.conv1.weight, before.backbone.conv1.weight)  # the rest trains


def test_frozen_bn_stays_in_eval_mode_through_train_and_evaluate():
    model = build_model(tiny().model).freeze_batchnorm()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.train()
    assert model.training and not any(m.training for m in bns)
    assert not any(p.requires_grad for m in bns for p in m.parameters())
    data = [(torch.randn(1, 3, 33, 33), torch.zeros(1, 33, 33, dtype=torch.long))]
    evaluate(model_predictor(model), data, 4)
    assert model.training and not any(m.training for m in bns)
    # the evaluator restores each module's own mode, not model.train(): a BN frozen by hand stays frozen too
    plain = build_model(tiny().model).train()
    plain.classifier[0].project[1].eval()
    evaluate(model_predictor(plain), data, 4)
    assert plain.backbone.bn1.training and not plain.classifier[0].project[1].training


# ---------------------------------------------------------------------------------------------------------
# 2. GradScaler


def test_resume_restores_the_grad_scaler(tmp_path, monkeypatch):
    """fp16 is CUDA-only in training, but the scaler's logic runs on CPU: force it on, then compare a resumed
    run's scaler with the uninterrupted run's (its growth tracker counts the steps since the last scale change)."""
    import deeplab.train_loop

    monkeypatch.setattr(deeplab.train_loop, "resolve_amp", lambda amp, device: torch.float16)
    cfg = tiny("train.eval_interval=2")
    full = Keep(tmp_path / "full")
    train(cfg, Worker(report=full))
    resumed = Keep(tmp_path / "resumed")
    train(cfg, Worker(report=resumed, latest_checkpoint=lambda: full.paths[2]))
    a = load_checkpoint(full.paths[4]).state["scaler"]
    b = load_checkpoint(resumed.paths[4]).state["scaler"]
    assert a and a["_growth_tracker"] == 4 and a == b


# ---------------------------------------------------------------------------------------------------------
# 3. Weight decay


def test_weight_decay_on_conv_weights_only(tmp_path):
    """The optimizer a run saves: convolution weights in a group with train.weight_decay, BN scale/shift and
    biases in one with 0 (the authors' implementation regularizes only the weights)."""
    keep = Keep(tmp_path)
    train(tiny("train.weight_decay=0.001", "train.max_iterations=1"), Worker(report=keep))
    saved = load_checkpoint(keep.paths[1])
    groups = saved.state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.001, 0.0]
    model = saved.model
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    others = [p for m in model.modules() for name, p in m.named_parameters(recurse=False)
              if isinstance(m, nn.BatchNorm2d) or name == "bias"]
    assert [len(g["params"]) for g in groups] == [len(convs), len(others)] and len(others) > 20
    assert len(convs) + len(others) == len(list(model.parameters()))
    decayed = set(groups[0]["params"])  # SGD's momentum buffers: one per trained parameter, by index
    assert decayed | set(groups[1]["params"]) == set(saved.state["optimizer"]["state"])


# ---------------------------------------------------------------------------------------------------------
# 4. BN decay


def test_paper_bn_decay_by_default_with_one_warning_for_a_short_run(tmp_path, capsys):
    assert TrainConfig().bn_momentum == 0.0003  # 1 - the paper's decay 0.9997
    keep = Keep(tmp_path)
    train(tiny("train.bn_momentum=0.0003", "train.max_iterations=2", "train.eval_interval=2"), Worker(report=keep))
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: train.bn_momentum=0.0003 leaves 100% of BatchNorm's initial running statistics after 2 "
                   "iterations, so evaluation would normalize with them: set train.bn_momentum >= 0.3 for a run "
                   "this short (the paper's 0.0003 suits 30000 iterations)"]
    stem = load_checkpoint(keep.paths[2]).model.backbone.bn1  # moved 1 - 0.9997^2 of the way from (0, 1)
    assert 0 < float(stem.running_mean.abs().max()) < 0.01 and float((stem.running_var - 1).abs().max()) < 0.05
    train(tiny("train.bn_momentum=0.5", "train.max_iterations=2", "train.eval_interval=2"))
    assert capsys.readouterr().err == ""


def test_short_configs_in_the_repo_set_their_own_bn_decay():
    from pathlib import Path

    import yaml

    from deeplab.config import bn_momentum_warning, experiment_from_dict

    for name in ("demo.yaml", "search_demo.yaml", "search_paper.yaml", "voc_stage1.yaml", "voc_stage2.yaml",
                 "cityscapes.yaml"):
        cfg = experiment_from_dict(yaml.safe_load((Path(__file__).parents[1] / "configs" / name).read_text()))
        cap = cfg.tune.max_iterations or cfg.train.max_iterations
        assert bn_momentum_warning(TrainConfig(**{**cfg.train.__dict__, "max_iterations": cap})) is None, name


# ---------------------------------------------------------------------------------------------------------
# 5. align_corners


class Impulse(nn.Module):
    """A classifier that ignores its input: one class, a single 1 at feature (j, j) of a 33x33 map."""

    def __init__(self, j):
        super().__init__()
        self.j = j

    def forward(self, x):
        out = torch.zeros(x.shape[0], 1, *x.shape[-2:])
        out[:, :, self.j, self.j] = 1.0
        return out


@pytest.mark.parametrize("j", [0, 5, 32])
def test_align_corners_puts_feature_j_on_pixel_16j_at_513(j):
    model = build_model(backbone="resnet_tiny", num_classes=1, aspp_channels=8).eval()
    assert model.config.align_corners is True  # head paper
    model.classifier = Impulse(j)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 513, 513))[0, 0]
    assert out.shape == (513, 513) and float(out[16 * j, 16 * j]) == 1.0
    assert divmod(int(out.argmax()), 513) == (16 * j, 16 * j)
    model.config.align_corners = False  # the stretch it replaces: inside the image, the peak leaves the grid
    with torch.no_grad():
        stretched = model(torch.zeros(1, 3, 513, 513))[0, 0]
    if 0 < j < 32:  # (the border pixels clamp to the border features either way)
        assert float(stretched[16 * j, 16 * j]) < 0.9 and divmod(int(stretched.argmax()), 513) != (16 * j, 16 * j)


def test_align_corners_follows_the_head_and_old_checkpoints_keep_false(tmp_path, tiny_model_config):
    assert ModelConfig(head="torchvision", multi_grid=(1, 1, 1)).align_corners is False
    assert ModelConfig(head="paper", align_corners=False).align_corners is False
    path = tmp_path / "old.ckpt"
    save_checkpoint(path, build_model(tiny_model_config), tiny_model_config)
    payload = torch.load(path, weights_only=True)
    del payload["model_config"]["align_corners"]  # written before the field existed
    torch.save(payload, path)
    assert load_checkpoint(path).config.align_corners is False


def test_align_corners_false_keeps_the_torchvision_forward():
    """head torchvision: upsampling exactly as torchvision's DeepLabV3 (align_corners=False everywhere)."""
    cfg = ModelConfig(backbone="resnet_tiny", num_classes=3, aspp_channels=8, head="torchvision", multi_grid=(1, 1, 1),
                      output_stride=8)
    model = build_model(cfg).eval()
    x = torch.randn(1, 3, 57, 61)
    with torch.no_grad():
        features = model.backbone(x)["out"]
        aspp = model.classifier[0]
        branches = [branch(features) for branch in aspp.convs[:-1]]
        pooled = aspp.convs[-1][3](aspp.convs[-1][2](aspp.convs[-1][1](aspp.convs[-1][0](features))))
        branches.append(F.interpolate(pooled, size=features.shape[-2:], mode="bilinear", align_corners=False))
        logits = model.classifier[1:](aspp.project(torch.cat(branches, 1)))
        reference = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(x), reference, rtol=0, atol=0)


def test_multi_scale_inference_resizes_with_the_models_corners():
    """A 129 input at scale 0.5 is 65 = 16k + 1: with aligned corners the resize keeps every 2nd pixel exactly."""
    from deeplab.inference import predict_logits

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = ModelConfig(align_corners=True)
            self.seen = []

        def forward(self, x):
            self.seen.append(x)
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    probe = Probe()
    x = torch.randn(1, 3, 129, 129)
    predict_logits(probe, x, scales=(0.5, 1.0))
    torch.testing.assert_close(probe.seen[0], x[:, :, ::2, ::2], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_onnx_parity_at_513_with_align_corners(tmp_path):
    """The exporter traces the model's own resizes: ONNX Resize with align_corners coordinates, same logits."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from export.to_onnx import export_checkpoint

    cfg = ModelConfig(backbone="resnet_tiny", num_classes=3, aspp_channels=8, output_stride=16)
    assert cfg.align_corners
    torch.manual_seed(0)
    model = build_model(cfg)
    for m in model.modules():  # logits with some range, so a misplaced pixel shows
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    nn.init.normal_(model.classifier[-1].weight, std=1.0)
    save_checkpoint(tmp_path / "m.ckpt", model, cfg)
    onnx_path = tmp_path / "m.onnx"
    export_checkpoint(tmp_path / "m.ckpt", onnx_path, output_stride=16, parity_sizes=(65,))
    import onnx

    modes = {a.s.decode() for n in onnx.load(str(onnx_path)).graph.node if n.op_type == "Resize"
             for a in n.attribute if a.name == "coordinate_transformation_mode"}
    assert modes == {"align_corners"}
    x = torch.randn(1, 3, 513, 513)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - expected).max() <= 1e-3 * max(1.0, abs(expected).max())
    assert (got.argmax(1) == expected.argmax(1)).mean() > 0.999


# ---------------------------------------------------------------------------------------------------------
# 6. One image per worker


def test_one_image_per_worker_is_refused_only_where_bn_would_see_one_value():
    from deeplab.config import per_worker_batch

    assert per_worker_batch(2, 2, synchronized_bn=True) == 1  # BN over the global batch of 2
    assert per_worker_batch(1, 1, frozen_bn=True) == 1  # frozen BN uses running statistics
    for args in ((1, 1), (2, 2)):  # one worker; two workers without synchronized BN
        with pytest.raises(ConfigError, match="would see one value per channel"):
            per_worker_batch(*args)
    assert load_config(None, ["train.batch_size=2", "cluster.num_workers=2"]).train.batch_size == 2
    with pytest.raises(ConfigError, match=r"^--set train\.batch_size=1, --set cluster\.num_workers=1: .*1 image per "
                                          r"worker and, with one worker"):
        load_config(None, ["train.batch_size=1", "cluster.num_workers=1"])


def _one_image_worker(rank, port, out_dir):
    from cluster.syncbn import convert_sync_batchnorm, revert_sync_batchnorm
    from deeplab.checkpoint import unwrap

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    cfg = tiny("train.max_iterations=2", "train.eval_interval=2", "cluster.num_workers=2")

    def prepare(model):
        return nn.parallel.DistributedDataParallel(convert_sync_batchnorm(model, "cpu"))

    def plain(model):
        import copy

        return revert_sync_batchnorm(copy.deepcopy(unwrap(model)))

    metrics = train(cfg, Worker(rank=rank, world_size=2, prepare_model=prepare, plain_model=plain,
                                synchronized_bn=True))
    torch.save({"loss": metrics["loss"], "iteration": metrics["iteration"]}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_one_image_per_worker_trains_with_synchronized_bn_over_two_gloo_workers(tmp_path):
    """Global batch 2 over 2 workers: the image-pooling BN sees 2 values per channel through SyncBN."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    mp.start_processes(_one_image_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method=method)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["iteration"] for r in results] == [2, 2]
    assert results[0]["loss"] == results[1]["loss"] and torch.isfinite(torch.tensor(results[0]["loss"]))


# ---------------------------------------------------------------------------------------------------------
# 7. Table 1 strides


def test_table1_strides_block_layout_against_the_paper():
    """ResNet with block5-7 (cascade_blocks 3): each block strides until the output stride is reached, then
    keeps stride 1 and doubles the rate (Section 3.1). Multi-Grid (1, 2, 4) multiplies block4+ unit rates; in
    block2-3 the unit whose stride is removed keeps the rate of its input (issue 18: an exact densification)."""
    for output_stride in (4, 8, 16, 32, 64, 128, 256):
        cfg = ModelConfig(backbone="resnet50", output_stride=output_stride, cascade_blocks=3,
                          aspp_rates=(max(1, output_stride // 16),))
        layout = block_layout(cfg)
        stride, rate, expected = 4, 1, []
        for block in range(7):
            if block == 0:
                s = 1
            elif stride < output_stride:
                s = 2
            else:
                s, rate = 1, rate * 2
            stride *= s
            expected.append((s, rate))
        block_rates = [(s, rates[0] // cfg.multi_grid[0] if b >= 3 else rates[-1])
                       for b, (s, rates) in enumerate(layout)]
        assert block_rates == expected
        for b in (1, 2):
            assert layout[b][1][0] == expected[b - 1][1]  # the first unit: its input's rate
        assert stride == output_stride
        for b in range(3, 7):  # Multi-Grid on block4..7
            assert layout[b][1] == [expected[b][1] * r for r in cfg.multi_grid]
    # the paper's example: OS16 gives block4-7 rates 2, 4, 8, 16 (before Multi-Grid)
    l16 = block_layout(ModelConfig(output_stride=16, cascade_blocks=3, multi_grid=(1, 1, 1)))
    assert [rates[0] for _, rates in l16[3:]] == [2, 4, 8, 16]
    # OS256: no atrous convolution anywhere
    l256 = block_layout(ModelConfig(output_stride=256, cascade_blocks=3, multi_grid=(1, 1, 1), aspp_rates=(16,)))
    assert all(set(rates) == {1} for _, rates in l256) and [s for s, _ in l256] == [1, 2, 2, 2, 2, 2, 2]


def test_table1_strides_need_the_cascaded_blocks_that_carry_them():
    for output_stride, blocks in ((64, 1), (128, 2), (256, 3)):
        with pytest.raises(ConfigError, match=f"set cascade_blocks >= {blocks}"):
            ModelConfig(output_stride=output_stride, cascade_blocks=blocks - 1, aspp_rates=(output_stride // 16,))
        ModelConfig(output_stride=output_stride, cascade_blocks=blocks, aspp_rates=(output_stride // 16,))
    with pytest.raises(ConfigError, match="use multiples of 4"):
        ModelConfig(output_stride=64, cascade_blocks=1)  # (6, 12, 18) at OS16 cannot be scaled by 1/4
    model = build_model(backbone="resnet_tiny", num_classes=2, aspp_channels=8, output_stride=256, cascade_blocks=3,
                        aspp_rates=(16,)).eval()
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 513, 513))["out"]
        assert features.shape[-2:] == (3, 3)  # 513 / 256, rounded up
        assert model(torch.zeros(1, 3, 513, 513)).shape == (1, 2, 513, 513)


# ---------------------------------------------------------------------------------------------------------
# 9. The cascade-only head of Tables 1-3


def test_cascade_only_head_is_a_1x1_conv_on_the_last_block():
    cfg = ModelConfig(backbone="resnet_tiny", num_classes=3, output_stride=64, cascade_blocks=1, aspp=False)
    model = build_model(cfg)
    assert cfg.rates_at() == () and not any(isinstance(m, nn.BatchNorm2d) for m in model.classifier.modules())
    assert [type(m) for m in model.classifier] == [nn.Conv2d]
    assert model.classifier[0].kernel_size == (1, 1) and model.classifier[0].in_channels == model.backbone.out_channels


def test_cascade_only_aspp_at_a_stride_its_rates_cannot_reach_names_the_way_out():
    with pytest.raises(ConfigError) as e:
        ModelConfig(output_stride=64, cascade_blocks=1)
    message = str(e.value)
    assert "\n" not in message and "model.aspp: false" in message and "use multiples of 4, e.g. [8, 12, 20]" in message
    ModelConfig(output_stride=64, cascade_blocks=1, aspp_rates=(8, 12, 20))  # the rates it proposes work
    with pytest.raises(ConfigError, match=r"^--set model.output_stride=64: model.aspp_rates=\[6, 12, 18\]"):
        load_config(None, ["model.output_stride=64", "model.cascade_blocks=1"])  # names what the user changed
    with pytest.raises(ConfigError, match="model.aspp: false"):
        ModelConfig(output_stride=32, aspp_rates=(3, 6, 9))
    assert ModelConfig(output_stride=256, cascade_blocks=3, aspp=False).aspp_rates == (6, 12, 18)  # ignored
    with pytest.raises(ConfigError, match="aspp true"):
        ModelConfig(head="torchvision", multi_grid=(1, 1, 1), aspp=False)


def test_cascade_only_is_not_pruned_for_aspp_rates_it_does_not_have():
    """The search prunes ASPP rates that degenerate to 1x1 filters (Figure 4); without ASPP there are none."""
    from deeplab.config import ExperimentConfig
    from tuning.spaces import prune_reason

    with_aspp = load_config(None, ["model.backbone=resnet_tiny", "data.crop_size=65", "model.output_stride=16"])
    assert "ASPP rate" in prune_reason(with_aspp, 0.5, 1)
    without = ExperimentConfig(**{**with_aspp.__dict__, "model": ModelConfig(backbone="resnet_tiny", aspp=False)})
    assert prune_reason(without, 0.5, 1) is None


TABLE1_STRIDES = (4, 8, 16, 32, 64, 128, 256)


def _cascade_only(output_stride, *extra):
    return load_config(None, ["model.backbone=resnet_tiny", "model.num_classes=3", "model.cascade_blocks=3",
                              "model.aspp=false", f"model.output_stride={output_stride}", "train.max_iterations=1",
                              "train.batch_size=2", "train.eval_interval=1", "train.amp=off", "data.crop_size=65",
                              "data.synthetic_size=65", "data.synthetic_train=2", "data.synthetic_val=1",
                              "data.synthetic_classes=3", "data.loader_workers=0", "cluster.num_workers=1", *extra])


@pytest.mark.parametrize("output_stride", TABLE1_STRIDES)
def test_cascade_only_trains_at_every_stride(tmp_path, output_stride):
    """Table 1: block4..block7 without ASPP at output stride 4-256 builds and takes a training step (the
    project's loop, one worker) that changes its weights; the checkpoint rebuilds it."""
    keep = Keep(tmp_path)
    torch.manual_seed(0)
    before = build_model(_cascade_only(output_stride).model).classifier[0].weight.clone()
    train(_cascade_only(output_stride), Worker(report=keep))
    ckpt = load_checkpoint(keep.paths[1])
    assert ckpt.config.output_stride == output_stride and not ckpt.config.aspp
    assert not torch.equal(ckpt.model.classifier[0].weight, before)


@pytest.mark.slow
def test_cascade_only_exports_at_every_stride(tmp_path):
    """Each stride's model exports to ONNX (static 65x65: the exporter checks parity) and gives the same
    logits in onnxruntime."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from export.to_onnx import export_checkpoint

    x = torch.randn(1, 3, 65, 65)
    for output_stride in TABLE1_STRIDES:
        cfg = _cascade_only(output_stride).model
        model = build_model(cfg).eval()
        nn.init.normal_(model.classifier[0].weight, std=1.0)  # logits with some range
        save_checkpoint(tmp_path / "m.ckpt", model, cfg)
        onnx_path = tmp_path / f"os{output_stride}.onnx"
        export_checkpoint(tmp_path / "m.ckpt", onnx_path, output_stride=output_stride, dynamic=False,
                          parity_sizes=(65,), parity_batch=1)
        with torch.no_grad():
            expected = model(x).numpy()
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == (1, 3, 65, 65)
        assert abs(got - expected).max() <= 1e-3 * max(1.0, abs(expected).max()), output_stride


# ---------------------------------------------------------------------------------------------------------
# 10. The VOC stage configs


def test_voc_stage_configs_evaluate_at_513_and_stage2_bootstraps():
    """Section 4.1: crop 513 "during both training and test"; Section 4.3: the test-server model (stage 2)
    duplicates images with the hard classes bicycle, chair, table, potted plant and sofa."""
    from pathlib import Path

    import yaml

    from deeplab.config import experiment_from_dict

    configs = Path(__file__).parents[1] / "configs"
    stage1, stage2 = (experiment_from_dict(yaml.safe_load((configs / name).read_text()))
                      for name in ("voc_stage1.yaml", "voc_stage2.yaml"))
    for cfg in (stage1, stage2):
        assert cfg.data.crop_size == 513 and cfg.data.val_size == 513
    assert stage1.data.bootstrap_classes == () and stage1.model.output_stride == 16
    assert stage2.data.bootstrap_classes == (2, 9, 11, 16, 18) and stage2.data.bootstrap_repeat == 2
    assert stage2.model.output_stride == 8 and stage2.model.atrous_layout == "exact"
