"""CPU synchronized BatchNorm against plain BatchNorm2d on the concatenated batch.

Two real gloo processes run every scenario once (module fixture) and save what they saw; each test then
rebuilds the same data in this process and compares with nn.BatchNorm2d (or a plain model) run on the
concatenation of the workers' batches.

What is equal, and why: with per-worker losses L_r, the synchronized forward is BN of the global batch,
so outputs and running stats match directly. The input gradient on worker r is d(sum_r L_r)/dx_r (the
all-reduce's backward sums the statistics' gradients), i.e. the concatenated batch's gradient of the
summed loss. BN's weight/bias gradients are local (d L_r / dw), so their SUM over workers equals the
concatenated batch's gradient; under DDP with per-worker mean losses the AVERAGE does, so a DDP model
ends up with the same parameters as one process trained on the concatenated batch.
"""
import datetime
import multiprocessing
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cluster.config import ClusterConfig
from cluster.syncbn import SyncBatchNorm2d, convert_sync_batchnorm, revert_sync_batchnorm
from cluster.worker import ddp_options

C, H, W = 3, 5, 4
STEPS = 3


def _data(seed, sizes, offset=0.0, scale=2.0):
    """The concatenated batch and an upstream gradient for loss = sum(y * g), split by worker sizes."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, C, H, W, generator=g) * scale + torch.tensor([0.5, -1.0, 3.0])[None, :, None, None] + offset
    gout = torch.randn(n, C, H, W, generator=g)
    return x, gout


def _split(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def _bn(cls, momentum=0.1):
    bn = cls(C, momentum=momentum)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(C, generator=g))
    return bn


SCENARIOS = {  # name: (per-worker batch sizes, momentum, data offset, data scale)
    "even": ([4, 4], 0.1, 0.0, 2.0),
    "uneven": ([2, 5], None, 0.0, 2.0),
    "empty_worker": ([3, 0], 0.1, 0.0, 2.0),
    "large_mean": ([4, 4], 0.1, 1000.0, 0.05),  # E[x^2]-E[x]^2 in float32 would lose the variance
}


def _ddp_model():
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),  # [4] is frozen: eval mode, no grads
        nn.Conv2d(4, 2, 1),
    )
    with torch.no_grad():
        model[4].running_mean.uniform_(-0.5, 0.5)
        model[4].running_var.uniform_(0.5, 2.0)
    for p in model[4].parameters():
        p.requires_grad_(False)
    return model


def _ddp_train_mode(model):
    model.train()
    getattr(model, "module", model)[4].eval()


def _ddp_batches(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randn(8, 2, 6, 6, generator=g)


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)  # two workers on a shared machine: no intra-op thread pools spinning
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    results = {}
    for name, (sizes, momentum, offset, scale) in SCENARIOS.items():
        bn = _bn(SyncBatchNorm2d, momentum)
        steps = []
        for step in range(STEPS):
            x, gout = _data(step, sizes, offset, scale)
            x = _split(x, sizes, rank).clone().requires_grad_(True)
            y = bn(x)
            (y * _split(gout, sizes, rank)).sum().backward()
            steps.append({"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad.clone(), "db": bn.bias.grad.clone()})
            bn.weight.grad = bn.bias.grad = None
        bn.eval()
        x_eval, _ = _data(99, [4], offset, scale)
        results[name] = {"steps": steps, "state": bn.state_dict(), "eval": bn(x_eval).detach()}

    # bf16 activations (what autocast gives a BN on CPU): statistics still computed in float32.
    bn = _bn(SyncBatchNorm2d)
    x, _ = _data(5, [4, 4])
    y = bn(_split(x, [4, 4], rank).bfloat16())
    results["bf16"] = {"y": y.detach(), "state": bn.state_dict()}

    results["bf16_channels_last"] = _bf16_channels_last_step(rank)

    # A model with our SyncBN inside DDP (gloo, CPU), one frozen BN, trained with SGD, with the DDP options
    # the Ray workers use (gradients as bucket views, cluster.ddp_bucket_mb).
    model = convert_sync_batchnorm(_ddp_model(), "cpu")
    results["ddp_types"] = [type(m).__name__ for m in model]
    ddp = nn.parallel.DistributedDataParallel(model, **ddp_options(ClusterConfig()))
    _ddp_train_mode(ddp)
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for step in range(STEPS):
        x, target = _ddp_batches(step)
        loss = nn.functional.mse_loss(ddp(_split(x, [4, 4], rank)), _split(target, [4, 4], rank))
        opt.zero_grad()
        loss.backward()
        opt.step()
    results["ddp"] = revert_sync_batchnorm(ddp.module).state_dict()
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _bf16_channels_last_step(rank):
    """What autocast hands a BN in the demo (bf16, channels_last), forward and backward: outputs, input
    gradient, the collectives issued, and the float32 copies of the whole activation made in the forward."""
    bn = _bn(SyncBatchNorm2d)
    x, gout = _data(6, [4, 4])
    x = _split(x, [4, 4], rank).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    calls, real = [], dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        with torch.profiler.profile(record_shapes=True) as prof:
            y = bn(x)
        (y.float() * _split(gout, [4, 4], rank)).sum().backward()
    finally:
        dist.all_reduce = real
    copies = [e.name for e in prof.events() if e.name in ("aten::_to_copy", "aten::copy_")
              and e.input_shapes and list(e.input_shapes[0]) == list(x.shape)]
    return {"y": y.detach(), "dx": x.grad, "collectives": len(calls), "activation_copies": len(copies)}


def _run_ranks(worker, nprocs, out):
    """Run ``worker(rank, port, out)`` in ``nprocs`` real processes (one gloo group); what each saved."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # forkserver: torch (and the torch._dynamo modules DDP pulls in) is imported once by the server
    # instead of once per spawned worker, which takes most of this test's time on a busy 2-core machine.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        multiprocessing.get_context(method).set_forkserver_preload(
            ["torch", "torch._dynamo", "torch.nn.parallel", "cluster.syncbn", __name__])
    mp.start_processes(worker, args=(port, str(out)), nprocs=nprocs, join=True, start_method=method)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nprocs)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _run_ranks(_worker, 2, tmp_path_factory.mktemp("syncbn"))


def _close(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_matches_batchnorm_on_concatenated_batch(ranks, name):
    sizes, momentum, offset, scale = SCENARIOS[name]
    # large_mean (1000 +- 0.05): the float32 input itself carries ~1e-3 relative error of its spread,
    # so compare with a float64 BN at that tolerance (float32 nn.BatchNorm2d is no closer to it).
    dtype, tol = (torch.float64, 2e-3) if name == "large_mean" else (torch.float32, 1e-5)
    ref = _bn(nn.BatchNorm2d, momentum).to(dtype)
    for step in range(STEPS):
        x, gout = _data(step, sizes, offset, scale)
        x = x.to(dtype).requires_grad_(True)
        y = ref(x)
        (y * gout).sum().backward()
        y = y.detach()
        got = [r[name]["steps"][step] for r in ranks]
        _close(torch.cat([g["y"] for g in got]).to(dtype), y, atol=tol * float(y.abs().max()), rtol=tol)
        _close(torch.cat([g["dx"] for g in got]).to(dtype), x.grad, atol=tol * float(x.grad.abs().max()), rtol=tol)
        for key, grad in (("dw", ref.weight.grad), ("db", ref.bias.grad)):
            _close((got[0][key] + got[1][key]).to(dtype), grad, atol=tol * float(grad.abs().max()), rtol=tol)
        ref.weight.grad = ref.bias.grad = None
    for r in ranks:
        state = r[name]["state"]
        assert list(state) == list(ref.state_dict())
        _close(state["running_mean"].to(dtype), ref.running_mean)
        _close(state["running_var"].to(dtype), ref.running_var, rtol=1e-4)
        assert int(state["num_batches_tracked"]) == STEPS
    ref.eval()
    x_eval, _ = _data(99, [4], offset, scale)
    for r in ranks:
        y = ref(x_eval.to(dtype)).detach()
        _close(r[name]["eval"].to(dtype), y, atol=tol * float(y.abs().max()), rtol=tol)


def test_variance_is_exact_when_mean_dwarfs_spread(ranks):
    """Running variance against a float64 computation; the naive float32 formula fails this."""
    sizes, momentum, offset, scale = SCENARIOS["large_mean"]
    rv = torch.ones(C, dtype=torch.float64)
    for step in range(STEPS):
        x, _ = _data(step, sizes, offset, scale)
        rv = (1 - momentum) * rv + momentum * x.double().var(dim=(0, 2, 3), unbiased=True)
        x32 = x.float()
        naive = (x32 * x32).mean(dim=(0, 2, 3)) - x32.mean(dim=(0, 2, 3)) ** 2
        exact = x.double().var(dim=(0, 2, 3), unbiased=False)
        assert ((naive.double() - exact).abs() / exact).max() > 0.05  # the trap is real
    for r in ranks:
        got = r["large_mean"]["state"]["running_var"].double()
        assert ((got - rv).abs() / rv).max() < 1e-4


def test_bf16_input_keeps_float32_statistics(ranks):
    ref = _bn(nn.BatchNorm2d)
    x, _ = _data(5, [4, 4])
    x16 = x.bfloat16()
    y = ref(x16.float())
    got = torch.cat([r["bf16"]["y"] for r in ranks])
    assert got.dtype == torch.bfloat16
    _close(got.float(), y.detach(), atol=2e-2, rtol=2e-2)
    for r in ranks:
        assert r["bf16"]["state"]["running_var"].dtype == torch.float32
        _close(r["bf16"]["state"]["running_mean"], ref.running_mean)
        _close(r["bf16"]["state"]["running_var"], ref.running_var)


def test_bf16_channels_last_forward_and_backward_in_one_collective_each_without_float32_copies(ranks):
    ref = _bn(nn.BatchNorm2d)
    x, gout = _data(6, [4, 4])
    x = x.bfloat16().float().requires_grad_(True)  # the same bf16 values, normalized in float32
    (ref(x) * gout).sum().backward()
    for rank, r in enumerate(ranks):
        got = r["bf16_channels_last"]
        assert (got["collectives"], got["activation_copies"]) == (2, 0)
        assert got["y"].dtype == got["dx"].dtype == torch.bfloat16
        _close(got["y"].float(), _split(ref(x).detach(), [4, 4], rank), atol=3e-2, rtol=2e-2)
        _close(got["dx"].float(), _split(x.grad, [4, 4], rank), atol=3e-2, rtol=2e-2)


def _one_process_on_the_8():
    """The reference for the DDP runs: the same model trained in one process on each whole batch of 8."""
    model = _ddp_model()
    _ddp_train_mode(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for step in range(STEPS):
        x, target = _ddp_batches(step)
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


def test_ddp_step_equals_single_process_on_concatenated_batch(ranks):
    frozen = {k: v.clone() for k, v in _ddp_model()[4].state_dict().items()}
    assert ranks[0]["ddp_types"][1] == "SyncBatchNorm2d" and ranks[0]["ddp_types"][4] == "SyncBatchNorm2d"
    ref = _one_process_on_the_8()
    init = _ddp_model().state_dict()
    assert not torch.allclose(ref["0.weight"], init["0.weight"])  # it did train
    for r in ranks:
        assert list(r["ddp"]) == list(ref)
        for k in ref:
            _close(r["ddp"][k], ref[k], atol=1e-5, rtol=1e-4)
        for k, v in frozen.items():
            assert torch.equal(r["ddp"][f"4.{k}"], v), k  # frozen BN kept its statistics


# --- elastic training's uneven split: 3 workers, global batch 8 -> shares 3, 3, 2 ----------------


def _rows(rank, workers=3, batch=8):
    """The images of the global batch that rank takes (deeplab.train_loop.GlobalBatchSampler: every W-th)."""
    return list(range(rank, batch, workers))


def _worker_uneven(rank, port, out_dir):
    """SyncBN on this rank's share of 8 images, then a DDP step with the engine's share-weighted loss."""
    from deeplab.config import split_batch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3,
                            timeout=datetime.timedelta(seconds=60))
    rows = _rows(rank)
    assert len(rows) == split_batch(8, 3, rank)
    bn = _bn(SyncBatchNorm2d)
    steps = []
    for step in range(STEPS):
        x, gout = _data(step, [8])
        x = x[rows].clone().requires_grad_(True)
        y = bn(x)
        (y * gout[rows]).sum().backward()
        steps.append({"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad.clone()})
        bn.weight.grad = bn.bias.grad = None
    ddp = nn.parallel.DistributedDataParallel(convert_sync_batchnorm(_ddp_model(), "cpu"))
    _ddp_train_mode(ddp)
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    share = split_batch(8, 3, rank) * 3 / 8
    for step in range(STEPS):
        x, target = _ddp_batches(step)
        loss = nn.functional.mse_loss(ddp(x[rows]), target[rows]) * share
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"shares": len(rows), "steps": steps, "state": bn.state_dict(),
                "ddp": revert_sync_batchnorm(ddp.module).state_dict()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return _run_ranks(_worker_uneven, 3, tmp_path_factory.mktemp("syncbn3"))


def test_uneven_3_3_2_split_has_the_statistics_of_the_whole_batch(three_ranks):
    assert [r["shares"] for r in three_ranks] == [3, 3, 2]
    ref = _bn(nn.BatchNorm2d)
    for step in range(STEPS):
        x, gout = _data(step, [8])
        x = x.requires_grad_(True)
        y = ref(x)
        (y * gout).sum().backward()
        y = y.detach()
        got_y, got_dx = torch.empty_like(y), torch.empty_like(x.grad)
        for rank, r in enumerate(three_ranks):
            got_y[_rows(rank)] = r["steps"][step]["y"]
            got_dx[_rows(rank)] = r["steps"][step]["dx"]
        _close(got_y, y, atol=1e-5 * float(y.abs().max()))
        _close(got_dx, x.grad, atol=1e-5 * float(x.grad.abs().max()))
        _close(sum(r["steps"][step]["dw"] for r in three_ranks), ref.weight.grad)
        ref.weight.grad = ref.bias.grad = None
    for r in three_ranks:
        _close(r["state"]["running_mean"], ref.running_mean)
        _close(r["state"]["running_var"], ref.running_var, rtol=1e-4)


def test_uneven_ddp_step_with_share_weighted_loss_equals_one_process_on_the_8(three_ranks):
    ref = _one_process_on_the_8()
    for r in three_ranks:
        for k in ref:
            _close(r["ddp"][k], ref[k], atol=1e-5, rtol=1e-4)


# --- single process: no process group, conversion round trips ----------------------------------


@pytest.mark.parametrize("momentum,track", [(0.1, True), (None, True), (0.1, False)])
def test_without_process_group_is_exactly_batchnorm(momentum, track):
    assert not dist.is_initialized()
    ours, ref = SyncBatchNorm2d(C, momentum=momentum, track_running_stats=track), nn.BatchNorm2d(
        C, momentum=momentum, track_running_stats=track)
    for step in range(STEPS):
        x, gout = _data(step, [4])
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ours(xa), ref(xb)
        (ya * gout).sum().backward()
        (yb * gout).sum().backward()
        assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
        assert torch.equal(ours.weight.grad, ref.weight.grad)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    ours.eval(), ref.eval()
    x, _ = _data(9, [2])
    assert torch.equal(ours(x), ref(x))


def _convnet():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    net.train()
    net(torch.randn(4, 3, 8, 8))  # non-trivial running stats and num_batches_tracked
    net[2][1].eval()  # a frozen BN
    net[2][1].weight.requires_grad_(False)
    return net


@pytest.mark.parametrize("device_type,cls", [("cpu", SyncBatchNorm2d), ("cuda", nn.SyncBatchNorm)])
def test_convert_revert_round_trip(device_type, cls):
    net = _convnet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    synced = convert_sync_batchnorm(net, device_type)
    assert type(synced[1]) is cls and type(synced[2][1]) is cls
    assert synced[1].training and not synced[2][1].training
    assert not synced[2][1].weight.requires_grad and synced[2][1].bias.requires_grad
    assert list(synced.state_dict()) == list(before)
    plain = revert_sync_batchnorm(synced)
    assert type(plain[1]) is nn.BatchNorm2d and type(plain[2][1]) is nn.BatchNorm2d
    assert plain[1].training and not plain[2][1].training
    assert not plain[2][1].weight.requires_grad
    assert list(plain.state_dict()) == list(before)
    for k, v in before.items():
        assert torch.equal(plain.state_dict()[k], v), k
    # and a plain checkpoint loads into the synchronized model with strict keys
    convert_sync_batchnorm(_convnet(), device_type).load_state_dict(before, strict=True)


def test_deeplab_model_converts_and_reverts_without_changing_its_function():
    from deeplab import ModelConfig, build_model

    model = build_model(ModelConfig(backbone="resnet_tiny", num_classes=3, aspp_channels=16)).eval()
    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        before = model(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    synced = convert_sync_batchnorm(model, "cpu")
    assert sum(type(m) is SyncBatchNorm2d for m in synced.modules()) == n_bn > 0
    synced.train()
    synced(x).sum().backward()  # no process group: plain BatchNorm behaviour, trains
    synced.eval()
    plain = revert_sync_batchnorm(synced)
    assert not any(isinstance(m, SyncBatchNorm2d) for m in plain.modules())
    with torch.no_grad():
        after = plain(x)
    assert after.shape == before.shape == (2, 3, 65, 65)
    assert not torch.equal(after, before)  # the training step moved the running statistics
    # and the reverted model's state loads into a fresh plain model with identical outputs
    fresh = build_model(ModelConfig(backbone="resnet_tiny", num_classes=3, aspp_channels=16)).eval()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), after)
