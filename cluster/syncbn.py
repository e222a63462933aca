"""Synchronized BatchNorm that also runs on CPU workers (gloo).

torch.nn.SyncBatchNorm refuses CPU tensors, so CPU workers use `SyncBatchNorm2d`: in training each worker
computes its per-channel count, mean and sum of squared deviations, the workers all-reduce them with the
differentiable all-reduce (`_AllReduceSum`), and every worker normalizes with the
statistics of the global batch. With N workers of batch b the outputs, input gradients and running
statistics equal plain BatchNorm2d on the concatenated N*b batch (weight/bias gradients summed over the
workers equal the concatenated batch's; DDP averages them, as it averages every other gradient).

Numerics: statistics are computed in float32 whatever the input dtype (bf16/fp16 autocast), local
variances with a two-pass `var_mean` (no cancellation), and the cross-worker combination
E[x^2] - E[x]^2 in float64, so a large mean relative to the spread does not wipe out the variance.

The module keeps BatchNorm2d's state_dict keys, so checkpoints move freely between the two;
`revert_sync_batchnorm` turns every synchronized BN back into BatchNorm2d for export and saving.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a sum over workers is the sum of the workers'
    gradients. The same as torch.distributed.nn.functional.all_reduce, which torch 2.13 deprecates for a
    private module; this keeps to the public dist.all_reduce."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad, ctx.group), None


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch across all workers.

    Outside a process group (or with one worker) it is exactly BatchNorm2d. In eval mode it uses the
    running statistics, so frozen BN (`module.eval()` inside a training model) works as usual.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Same rule as torch.nn.SyncBatchNorm: synchronize only when training (eval without running
        # stats normalizes each worker's batch by itself, as BatchNorm2d would).
        if not self.training or _world_size(self.process_group) == 1:
            return super().forward(input)
        self._check_input_dim(input)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        mean, var, count = self._global_stats(input)
        if self.track_running_stats:
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():
                unbiased = var.detach() * (count / (count - 1))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.float()
        out = (input.float() - mean[None, :, None, None]) * scale[None, :, None, None]
        if self.bias is not None:
            out = out + self.bias.float()[None, :, None, None]
        return out.to(input.dtype)

    def _global_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per-channel mean and biased variance over every worker's batch (float32, differentiable),
        and the global count of values per channel."""
        x = x.float()
        n = x.numel() // x.shape[1]
        if n > 0:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        else:  # an empty local batch still joins the collective (zeros that keep the graph)
            mean = var = x.sum(dim=(0, 2, 3))
        mean, var = mean.double(), var.double()
        local = torch.stack([torch.full_like(mean, n), mean * n, (var + mean * mean) * n])
        group = dist.group.WORLD if self.process_group is None else self.process_group
        total = _AllReduceSum.apply(local, group)
        count = float(total[0, 0].detach())
        if count <= 1:
            raise ValueError(
                f"SyncBatchNorm2d: expected more than 1 value per channel across all workers when "
                f"training, got {int(count)} (input size {list(x.shape)} on this worker)")
        g_mean = total[1] / count
        g_var = (total[2] / count - g_mean * g_mean).clamp_min(0)
        return g_mean.float(), g_var.float(), count


def _copy_bn(src: nn.modules.batchnorm._BatchNorm, dst: nn.modules.batchnorm._BatchNorm):
    """Give `dst` the parameters and buffers of `src` (shared, so requires_grad and optimizers carry over)."""
    dst.weight, dst.bias = src.weight, src.bias
    dst.running_mean, dst.running_var = src.running_mean, src.running_var
    dst.num_batches_tracked = src.num_batches_tracked
    dst.training = src.training
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
    return dst


def _replace(module: nn.Module, convert) -> nn.Module:
    out = convert(module)
    if out is not None:
        module = out
    for name, child in module.named_children():
        module.add_module(name, _replace(child, convert))
    return module


def convert_sync_batchnorm(module: nn.Module, device_type: str, process_group=None) -> nn.Module:
    """Replace every BatchNorm2d by a synchronized one: torch.nn.SyncBatchNorm on accelerators,
    SyncBatchNorm2d on CPU. Call before wrapping the model in DDP (ray.train.torch.prepare_model)."""
    if device_type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)

    def convert(m):
        if isinstance(m, SyncBatchNorm2d) or not isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            return None
        new = SyncBatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                              process_group=process_group)
        return _copy_bn(m, new)

    return _replace(module, convert)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every synchronized BN (ours or torch's) by plain BatchNorm2d, e.g. for export or saving."""

    def convert(m):
        if not isinstance(m, (SyncBatchNorm2d, nn.SyncBatchNorm)):
            return None
        new = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        return _copy_bn(m, new)

    return _replace(module, convert)
