"""One worker's training loop without Ray: the paper's protocol, reports, checkpoints, exact resume."""
import os
import subprocess
import sys

import pytest
import torch

from deeplab import load_checkpoint
from deeplab.checkpoint import CHECKPOINT_FILE
from deeplab.config import ConfigError, ExperimentConfig, load_config, per_worker_batch
from deeplab.train_loop import Worker, poly_lr, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train) -> ExperimentConfig:
    """resnet_tiny on 65 px synthetic crops: behaviour, not accuracy."""
    cfg = load_config(None, [
        "model.backbone=resnet_tiny", "model.aspp_channels=16", "model.num_classes=4",
        "data.synthetic_classes=4", "data.synthetic_size=80", "data.crop_size=65",
        "data.synthetic_train=8", "data.synthetic_val=2", "data.loader_workers=0",
        "train.batch_size=2", "train.max_iterations=6", "train.eval_interval=3", "train.log_interval=100",
        "train.lr=0.01", "train.amp=off",
    ])
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg.check()


class Recorder:
    """A runner's report(): keeps metrics and copies each checkpoint (the loop deletes its temp dir)."""

    def __init__(self, folder):
        self.folder, self.reports, self.checkpoints = folder, [], []

    def __call__(self, metrics, checkpoint_dir):
        self.reports.append(metrics)
        if checkpoint_dir:
            dst = os.path.join(self.folder, f"it{metrics['iteration']}.ckpt")
            with open(os.path.join(checkpoint_dir, CHECKPOINT_FILE), "rb") as src, open(dst, "wb") as out:
                out.write(src.read())
            self.checkpoints.append(dst)


def test_per_worker_batch_of_one_is_refused_in_one_line():
    assert per_worker_batch(16, 8) == 2
    with pytest.raises(ConfigError) as e:
        per_worker_batch(4, 4)
    assert "1 image per worker" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="1 image per worker"):
        per_worker_batch(7, 4)  # shares 2, 2, 2, 1
    assert per_worker_batch(8, 3) == 2  # uneven shares 3, 3, 2 are fine


def test_cli_refuses_batch_one_on_a_single_worker_before_starting_ray():
    proc = subprocess.run([sys.executable, "-m", "cluster.train", "--config", "configs/demo.yaml",
                           "--set", "cluster.num_workers=1", "--set", "train.batch_size=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.batch_size=1" in lines[0] and "1 image per worker and, with one worker" \
        in lines[0]


def test_lr_follows_poly_schedule_and_checkpoints_load(tmp_path):
    cfg = tiny_config(max_iterations=5, eval_interval=1, lr=0.02)
    rec = Recorder(tmp_path)
    last = train(cfg, Worker(report=rec))
    assert [m["iteration"] for m in rec.reports] == [1, 2, 3, 4, 5]
    # the naive formula, written out: lr used for step k (k = 0..4) is 0.02 * (1 - k/5) ** 0.9
    for k, m in enumerate(rec.reports):
        assert m["lr"] == pytest.approx(0.02 * (1 - k / 5) ** 0.9, rel=1e-12)
    assert poly_lr(0.02, 0, 5) == 0.02 and poly_lr(0.02, 5, 5) == 0.0
    assert last == rec.reports[-1] and len(last["val_iou"]) == 4 and 0 <= last["val_miou"] <= 1
    ck = load_checkpoint(rec.checkpoints[-1])
    assert ck.state["iteration"] == 5 and ck.state["metrics"]["val_miou"] == pytest.approx(last["val_miou"])
    assert ck.experiment.data.crop_size == 65 and ck.config.backbone == "resnet_tiny"
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in ck.model.modules())


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(tmp_path):
    """8 images, batch 2: 4 steps per epoch; the checkpoint at iteration 3 is mid-epoch. Resuming from it
    (weights, optimizer, iteration, sampler position, RNG) must end where the uninterrupted run ends."""
    cfg = tiny_config(max_iterations=6, eval_interval=3)
    full = Recorder(tmp_path / "full")
    os.makedirs(full.folder)
    train(cfg, Worker(report=full))
    assert [m["iteration"] for m in full.reports] == [3, 6]

    resumed = Recorder(tmp_path / "resumed")
    os.makedirs(resumed.folder)
    train(cfg, Worker(report=resumed, latest_checkpoint=lambda: full.checkpoints[0]))
    assert [m["iteration"] for m in resumed.reports] == [6]  # nothing reported twice
    a = load_checkpoint(full.checkpoints[-1]).model.state_dict()
    b = load_checkpoint(resumed.checkpoints[-1]).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert resumed.reports[-1]["val_miou"] == full.reports[-1]["val_miou"]


def test_nan_loss_raises_floating_point_error():
    cfg = tiny_config(max_iterations=30, eval_interval=30, lr=1e12)
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at iteration \d+"):
        train(cfg)


def test_stage2_init_from_freezes_bn_and_keeps_weights(tmp_path):
    rec = Recorder(tmp_path)
    train(tiny_config(max_iterations=2, eval_interval=2), Worker(report=rec))
    stage1 = load_checkpoint(rec.checkpoints[-1])
    cfg = tiny_config(max_iterations=2, eval_interval=2, freeze_bn=True, init_from=rec.checkpoints[-1], lr=0.001)
    cfg.model.output_stride = 8
    rec2 = Recorder(tmp_path / "s2")
    os.makedirs(rec2.folder)
    train(cfg, Worker(report=rec2))
    stage2 = load_checkpoint(rec2.checkpoints[-1])
    assert stage2.config.output_stride == 8
    before, after = stage1.model.state_dict(), stage2.model.state_dict()
    bn = [n for n, m in stage2.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for name in bn:  # frozen: affine parameters and running statistics unchanged
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            torch.testing.assert_close(after[f"{name}.{leaf}"], before[f"{name}.{leaf}"], rtol=0, atol=0)
    conv = "backbone.conv1.weight"
    assert not torch.equal(after[conv], before[conv])  # the rest trains


def test_pretrained_backbone_is_read_by_the_caller_and_a_wrong_file_is_named(tmp_path):
    """The model takes a state dict; the training loop reads the file and names it when it does not fit."""
    from deeplab import ModelConfig, build_model
    from deeplab.train_loop import build_model_for_training

    resnet = build_model(ModelConfig(backbone="resnet_tiny", num_classes=4, aspp_channels=16)).backbone
    good = tmp_path / "resnet_tiny.pth"
    torch.save({**resnet.state_dict(), "fc.weight": torch.zeros(10, 32)}, good)
    model, state = build_model_for_training(tiny_config(pretrained_backbone=str(good)), None)
    assert state is None
    torch.testing.assert_close(model.backbone.conv1.weight, resnet.conv1.weight, rtol=0, atol=0)
    wrong = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ConfigError) as info:
        build_model_for_training(tiny_config(pretrained_backbone=str(wrong)), None)
    assert str(info.value) == f"train.pretrained_backbone={wrong}: no ResNet keys (conv1.weight, " \
                              "layer1.0.conv1.weight, ...) found"


@pytest.mark.parametrize("capability, expected", [
    ((6, 0), torch.float16), ((7, 0), torch.float16), ((7, 5), torch.float16),  # P100, V100, T4: emulated bf16
    ((8, 0), torch.bfloat16), ((8, 6), torch.bfloat16), ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16),
    ((10, 0), torch.bfloat16), ((12, 0), torch.bfloat16)])
def test_amp_auto_picks_bf16_only_where_the_gpu_has_it_natively(capability, expected):
    from deeplab.train_loop import cuda_amp_for_capability

    assert cuda_amp_for_capability(capability) == expected


def test_amp_auto_on_cuda_asks_the_capability_not_is_bf16_supported(monkeypatch):
    """A T4: torch.cuda.is_bf16_supported() says True (emulation); amp auto must still pick fp16 + GradScaler."""
    from deeplab.train_loop import resolve_amp

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # the GPU is mocked, not our code
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert resolve_amp("auto", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_amp("auto", torch.device("cuda")) == torch.bfloat16


def test_remote_init_from_and_pretrained_backbone_are_read_through_the_filesystem_layer(tmp_path):
    """Stage 2 on a cluster starts from stage 1's best.ckpt in an object store: fsspec's in-memory filesystem
    stands in for S3 (nothing of it is on the local disk), and pyarrow's file:// URI for another store."""
    import fsspec

    from deeplab import ModelConfig, build_model, save_checkpoint
    from deeplab.checkpoint import CheckpointError
    from deeplab.train_loop import build_model_for_training

    stage1 = build_model(tiny_config().model)
    save_checkpoint(tmp_path / "best.ckpt", stage1, tiny_config())
    store = fsspec.filesystem("memory")
    store.pipe("/bucket/voc_stage1/best.ckpt", (tmp_path / "best.ckpt").read_bytes())
    resnet = build_model(ModelConfig(backbone="resnet_tiny", num_classes=4, aspp_channels=16)).backbone
    torch.save(resnet.state_dict(), tmp_path / "resnet.pth")
    store.pipe("/bucket/resnet.pth", (tmp_path / "resnet.pth").read_bytes())
    try:
        for uri in ("memory://bucket/voc_stage1/best.ckpt", f"file://{tmp_path}/best.ckpt"):
            model, _ = build_model_for_training(tiny_config(init_from=uri, freeze_bn=True), None)
            for name, value in stage1.state_dict().items():
                torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
        model, _ = build_model_for_training(tiny_config(pretrained_backbone="memory://bucket/resnet.pth"), None)
        torch.testing.assert_close(model.backbone.conv1.weight, resnet.conv1.weight, rtol=0, atol=0)
        with pytest.raises(CheckpointError, match=r"^memory://bucket/voc_stage1/missing.ckpt: no such file$"):
            build_model_for_training(tiny_config(init_from="memory://bucket/voc_stage1/missing.ckpt"), None)
        with pytest.raises(CheckpointError, match=r"^memory://bucket/voc_stage1: is a folder"):
            build_model_for_training(tiny_config(init_from="memory://bucket/voc_stage1"), None)
    finally:
        store.rm("/bucket", recursive=True)


def test_evaluation_of_whole_images_of_many_sizes_runs_without_cudnn_benchmark_and_restores_it(monkeypatch):
    """GPU training turns cudnn.benchmark on for its fixed-size crops; validation images come in many sizes, so
    the evaluation turns it off while it runs (an algorithm search per new size costs more than it saves) and
    gives the training steps their setting back."""
    from deeplab.data import build_dataset
    from deeplab.train_loop import evaluate_shard

    cfg = tiny_config()
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.backends.cudnn.benchmark)
            return torch.zeros(x.shape[0], 4, *x.shape[2:])

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    cm = evaluate_shard(Recorder(), build_dataset(cfg.data, "val", train=False), 4, Worker())
    assert seen and not any(seen) and torch.backends.cudnn.benchmark is True
    assert cm.miou() >= 0
