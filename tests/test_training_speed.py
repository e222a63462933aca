"""What makes a second worker pay for itself, without Ray: the workers' thread and DDP settings, the optional
bf16 gradient compression, the median step speed the engine reports and `cluster.bench --scaling`'s pieces.
Fast: one single-process gloo group at most."""
import datetime
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cluster import bench
from cluster.config import ClusterConfig
from cluster.worker import compress_gradients, ddp_options
from deeplab.config import ConfigError, load_config
from deeplab.train_loop import Meter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def group_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def _trained(ddp_kwargs: dict, compression: str) -> list:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    model = compress_gradients(nn.parallel.DistributedDataParallel(model, **ddp_kwargs), compression)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step)) * 3
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_ddp_options_train_exactly_as_plain_ddp_and_bf16_compression_only_rounds(group_of_one):
    plain = _trained({}, "none")
    options = ddp_options(ClusterConfig(ddp_bucket_mb=0.001))  # several buckets for 8+ parameters
    assert options == {"bucket_cap_mb": 0.001, "gradient_as_bucket_view": True}
    for a, b in zip(plain, _trained(options, "none")):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    compressed = _trained(options, "bf16")
    assert any(not torch.equal(a, b) for a, b in zip(plain, compressed))  # the hook ran: gradients rounded
    for a, b in zip(plain, compressed):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


def test_compression_leaves_a_model_outside_ddp_alone():
    model = nn.Linear(2, 2)
    assert compress_gradients(model, "bf16") is model


@pytest.mark.parametrize("item, message", [
    ("cluster.grad_compression=fp8", "cluster.grad_compression=fp8"),
    ("cluster.ddp_bucket_mb=0", "cluster.ddp_bucket_mb=0 must be > 0"),
])
def test_bad_ddp_settings_are_named(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [item]).check()


def test_worker_threads_follow_its_cpus_with_one_inter_op_thread():
    code = ("import torch; from cluster.worker import set_worker_threads; set_worker_threads(1.5); "
            "print(torch.get_num_threads(), torch.get_num_interop_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.stdout.split() == ["1", "1"]


def test_median_speed_skips_warm_up_and_ignores_one_slow_step():
    meter = Meter(0)
    for seconds in (5.0, 4.0, 1.0, 1.0, 9.0, 0.5, 1.0):  # 2 warm-up steps, then one step slowed
        meter.step(0.1, seconds, 8)
    assert meter.median_speed == pytest.approx(8.0)
    assert meter.images / meter.train_time == pytest.approx(56 / 21.5)  # the mean over time counts them all
    meter.reset()
    meter.step(0.1, 2.0, 8)
    assert meter.median_speed == pytest.approx(4.0)


def test_scaling_table_gives_each_setup_its_ratio_to_every_other():
    table = bench.scaling_table({"bare loop, 2 threads": 20.0, "1 worker x 2 CPUs": 16.0, "2 workers x 1 CPU": 18.0})
    rows = table.splitlines()
    assert rows[0].split()[:2] == ["setup", "images/s"] and "vs 2 workers x 1 CPU" in rows[0]
    assert rows[2].split()[-4:] == ["16.00", "0.80x", "1.00x", "0.89x"]
    assert rows[3].split()[-4:] == ["18.00", "0.90x", "1.12x", "1.00x"]


def test_scaling_config_keeps_the_global_batch_and_refuses_one_workers_cannot_share():
    parse = bench.build_parser().parse_args
    cfg = bench._scaling_config(parse(["--scaling"]), cores=2)
    assert (cfg.train.batch_size, cfg.train.max_iterations, cfg.train.eval_interval) == (8, 20, 20)
    assert cfg.cluster.max_failures == 0 and cfg.data.synthetic_val <= 2
    assert bench._scaling_config(parse(["--scaling", "--iterations", "5"]), cores=2).train.max_iterations == 5
    with pytest.raises(ConfigError, match="train.batch_size=8: --scaling needs a global batch that 3 workers"):
        bench._scaling_config(parse(["--scaling"]), cores=3)
    with pytest.raises(ConfigError, match="--cores 0"):
        bench._scaling_config(parse(["--scaling"]), cores=0)


def test_bare_loop_trains_the_configs_model_and_gives_a_speed():
    parse = bench.build_parser().parse_args
    args = parse(["--scaling", "--iterations", "4", "--set", "model.backbone=resnet_tiny",
                  "--set", "model.aspp_channels=16", "--set", "data.crop_size=33", "--set", "train.batch_size=2",
                  "--set", "data.synthetic_size=40", "--set", "train.amp=off"])
    threads = torch.get_num_threads()
    try:
        assert bench.run_bare(bench._scaling_config(args, cores=1), threads=1) > 0
    finally:
        torch.set_num_threads(threads)


def test_scaling_help_names_the_three_setups():
    out = subprocess.run([sys.executable, "-m", "cluster.bench", "--help"], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}).stdout
    assert "--scaling" in out and "--cores N" in out
