"""Batch norm over the whole global batch: PyTorch's SyncBatchNorm on CUDA (eager), our own elsewhere and compiled.

With several processes each one sees B/W images; plain BatchNorm would normalise with those
alone, which changes the objective (and lets NT-Xent cheat through per-device statistics,
the SimCLR paper's reason for global BN).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import is_enabled
from ..errors import ConfigError


class _GlobalBatchNormFn(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * w + b with mean/var over every rank's rows.

    The backward is the closed form (as in cuDNN and PyTorch's own BN), not autograd through
    the statistics: differentiating mean and variance separately cancels catastrophically in
    fp32 for channels of tiny variance, which real images produce."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, c] + [1] * (x.dim() - 2)
        # the count made on the device: x.new_tensor would copy it from the host (a blocking copy on CUDA)
        stats = torch.cat([x.sum(dims), torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)])
        dist.all_reduce(stats)
        n = stats[-1]
        mean = stats[:-1] / n
        xmu = x - mean.view(shape)
        var = xmu.pow(2).sum(dims)
        dist.all_reduce(var)
        var = var / n  # biased: what the normalisation uses
        invstd = torch.rsqrt(var + eps)
        xhat = xmu * invstd.view(shape)
        y = xhat if weight is None else xhat * weight.view(shape) + bias.view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.n, ctx.dims, ctx.shape = n, dims, shape
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var, n

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dn):
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape, c = ctx.dims, ctx.shape, xhat.shape[1]
        local = torch.cat([dy.sum(dims), (dy * xhat).sum(dims)])
        # this rank's parameter gradients stay local: DDP averages them over ranks
        db, dw = local[:c].clone(), local[c:].clone()
        dist.all_reduce(local)  # dy arrives already summed over every rank's loss (collective backwards)
        mean_dy, mean_dy_xhat = (local / ctx.n).split(c)
        scale = invstd if weight is None else invstd * weight
        dx = (dy - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * scale.view(shape)
        needs = ctx.needs_input_grad
        return dx, (dw if needs[1] else None), (db if needs[2] else None), None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose statistics cover the whole global batch, on any device and backend.

    Written by hand because ``nn.SyncBatchNorm`` runs only on GPUs (DDP refuses it on CPU),
    while CPU/gloo training and our multi-process tests need the same semantics. Same
    parameters and buffers as a BatchNorm, so checkpoints do not change; outside training or
    without a process group it is a plain BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-d input (N, C, ...), got {x.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_enabled()):
            return super().forward(x)
        self._check_input_dim(x)
        xf = x if x.dtype == torch.float64 else x.float()  # statistics in fp32 at least
        w, b = (self.weight, self.bias) if self.affine else (None, None)
        y, mean, var, n = _GlobalBatchNormFn.apply(xf, w, b, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        return y.to(x.dtype)


class GlobalBatchNormAct(GlobalBatchNorm):
    """:class:`GlobalBatchNorm` followed by the dropout and activation of the timm ``BatchNormAct2d`` it replaces
    (timm's own ``SyncBatchNormAct`` does the same on CUDA)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _has_act(module: nn.Module) -> bool:
    """timm's BatchNormAct2d: a batch norm whose forward also applies ``drop`` and ``act``."""
    return isinstance(getattr(module, "act", None), nn.Module) and isinstance(getattr(module, "drop", None), nn.Module)


def _check_convertible(module: nn.Module) -> None:
    """Converting replaces the module by a plain synchronised batch norm: a subclass with its own forward (other
    than timm's BatchNormAct2d) would silently lose what that forward adds."""
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, GlobalBatchNorm) \
                and type(m).forward is not nn.modules.batchnorm._BatchNorm.forward and not _has_act(m):
            raise ConfigError(f"cannot synchronise {name or 'the model'} ({type(m).__name__}), a batch norm with its "
                             f"own forward, across processes; pass --sync_bn false")


def convert_sync_batchnorm(module: nn.Module, device: torch.device, compiled: bool = False) -> nn.Module:
    """Every BatchNorm -> PyTorch's SyncBatchNorm on CUDA (timm's converter when the model has timm's
    BatchNormAct2d), :class:`GlobalBatchNorm` elsewhere and for a model that will be compiled (``compiled``:
    SyncBatchNorm breaks torch.compile's graph at every layer; ours compiles without a break). Parameters and
    buffers are shared with the original module (same names, same objects). A model without batch norm (a ViT
    trunk) is returned with only its head's converted."""
    _check_convertible(module)
    if device.type == "cuda" and not compiled:
        if any(_has_act(m) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            from timm.layers import convert_sync_batchnorm as timm_convert  # only timm models have BatchNormAct2d
            return timm_convert(module)
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_global(module)


def _convert_global(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        cls = GlobalBatchNormAct if _has_act(module) else GlobalBatchNorm
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        if _has_act(module):
            out.drop, out.act = module.drop, module.act
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_global(child))
    return out
