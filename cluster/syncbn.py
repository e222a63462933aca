"""Synchronized BatchNorm that also runs on CPU workers (gloo).

torch.nn.SyncBatchNorm refuses CPU tensors, so CPU workers use `SyncBatchNorm2d`: in training each worker
computes its per-channel count, mean and sum of squared deviations, the workers all-reduce them (one collective
per layer), and every worker normalizes with the statistics of the global batch; the backward all-reduces the
two per-channel sums BatchNorm's input gradient needs (one collective per layer) and is otherwise BatchNorm's
(`_SyncBatchNormFunction`, the native kernels: no float32 copy of a bf16 activation). With N workers of
batch b the outputs, input gradients and running statistics equal plain BatchNorm2d on the concatenated N*b batch
(weight/bias gradients summed over the workers equal the concatenated batch's; DDP averages them, as it averages
every other gradient).

Numerics: statistics are computed in float32 whatever the input dtype (bf16/fp16 autocast), local
variances two-pass (the native kernel: no cancellation), and the cross-worker combination
E[x^2] - E[x]^2 in float64, so a large mean relative to the spread does not wipe out the variance.

The module keeps BatchNorm2d's state_dict keys, so checkpoints move freely between the two;
`revert_sync_batchnorm` turns every synchronized BN back into BatchNorm2d for export and saving.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    tensor = tensor.contiguous()
    dist.all_reduce(tensor, group=group)
    return tensor


def _local_moments(x: torch.Tensor, eps: float) -> tuple:
    """(mean, biased variance) per channel in float32, by the native BatchNorm kernel: it reads bf16/fp16
    input as is, accumulating in float32 around a two-pass mean (no float32 copy of the activation, no
    cancellation). An empty local batch gives zeros."""
    c = x.shape[1]
    if x.numel() == 0:
        zeros = x.new_zeros(c, dtype=torch.float32)
        return zeros, zeros
    ones, zeros = x.new_ones(c, dtype=torch.float32), x.new_zeros(c, dtype=torch.float32)
    _, mean, invstd = torch.native_batch_norm(x, ones, zeros, None, None, True, 0.0, eps)
    return mean, (invstd.double().pow(-2) - eps).clamp_min(0).float()


class _SyncBatchNormFunction(torch.autograd.Function):
    """BatchNorm with the statistics of the global batch: one all-reduce of (count, sum, sum of squares)
    per layer forward, one of (sum dy, sum dy*(x-mean)) per layer backward, the elementwise work in the
    native BatchNorm kernels (mixed bf16/float32 without copies). The backward is BatchNorm's with the
    global sums in place of the local ones, which is what autograd through the all-reduce computes."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        mean, var = _local_moments(x, eps)
        n = x.numel() // x.shape[1]
        mean64, var64 = mean.double(), var.double()
        local = torch.stack([torch.full_like(mean64, n), mean64 * n, (var64 + mean64 * mean64) * n])
        total = _all_reduce_sum(local, group)  # float64: E[x^2] - E[x]^2 keeps a small spread of a large mean
        count = float(total[0, 0])
        if count <= 1:
            raise ValueError(
                f"SyncBatchNorm2d: expected more than 1 value per channel across all workers when "
                f"training, got {int(count)} (input size {list(x.shape)} on this worker)")
        g_mean64 = total[1] / count
        g_var = (total[2] / count - g_mean64 * g_mean64).clamp_min(0).float()
        g_mean = g_mean64.float()
        invstd = torch.rsqrt(g_var + eps)
        p = _param_dtype(x)  # the kernels' parameter dtype: float32 beside bf16/fp16 input
        w = weight.to(p) if weight is not None else x.new_ones(x.shape[1], dtype=p)
        b = bias.to(p) if bias is not None else x.new_zeros(x.shape[1], dtype=p)
        out = torch.batch_norm(x, w, b, g_mean.to(p), g_var.to(p), False, 0.0, eps, False) if n else x.clone()
        ctx.save_for_backward(x, w, g_mean.to(p), invstd.to(p))
        ctx.eps, ctx.group, ctx.count = eps, group, count
        ctx.affine = (weight is not None, bias is not None)
        count_t = total[0, :1].float()
        ctx.mark_non_differentiable(g_mean, g_var, count_t)
        return out, g_mean, g_var, count_t

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var, _grad_count):
        x, w, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        if x.numel():
            grad_out = grad_out.contiguous(memory_format=_memory_format(x))
            _, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, w, None, None, mean, invstd, True, ctx.eps, [False, True, True])
        else:
            grad_w = grad_b = x.new_zeros(c, dtype=w.dtype)
        sums = _all_reduce_sum(torch.stack([grad_b, grad_w]), ctx.group)  # sum dy, sum dy*(x-mean)*invstd
        # dx = w*invstd*(dy - E[dy] - (x-mean)*invstd^2*E[dy*(x-mean)]) = a*dy + k*x + d, per channel
        a = w * invstd
        k = -a * invstd * sums[1] / ctx.count
        d = -a * sums[0] / ctx.count - k * mean
        view = (1, c, 1, 1)
        grad_x = grad_out * a.view(view)
        grad_x = grad_x.addcmul_(x, k.view(view)).add_(d.view(view)).to(x.dtype)
        has_w, has_b = ctx.affine
        return grad_x, grad_w if has_w else None, grad_b if has_b else None, None, None


def _param_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


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
        group = dist.group.WORLD if self.process_group is None else self.process_group
        with torch.autocast(input.device.type, enabled=False):
            out, mean, var, count = _SyncBatchNormFunction.apply(input, self.weight, self.bias, self.eps, group)
        count = float(count)
        if self.track_running_stats:
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():
                unbiased = var * (count / (count - 1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return out


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
