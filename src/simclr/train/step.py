"""One optimizer step and what it runs on: :class:`Parts` (built once by :func:`build` from the config, which
stays behind: the step reads only the parts), :func:`wrap` (DDP, ``torch.compile``), :func:`forward_backward`,
:func:`train_step` and the numerics of the :class:`DivergenceGuard` (whether a step's values allow its update).

``simclr bench`` and benchmarks/ call :func:`build`, :func:`wrap` and :func:`train_step` as the loop does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..config import switch_on
from ..data.loaders import build_loader
from ..gradcache import grad_cache_backward
from ..loss import Criterion, build_criterion
from ..models import SimCLRModel, build_model, convert_sync_batchnorm
from ..optim import build_optimizer, lr_schedule, scaled_lr, set_lr
from ..options import PretrainConfig
from ..runtime import autocast_dtype, channels_last_on, precision_name
from .probe import Probe, build_probe

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """What a run trains with, built once by :func:`build`: every option the step depends on is resolved into
    these fields, so the step takes the parts and no config."""
    model: SimCLRModel            # unwrapped: checkpoints and evaluation use it
    forward: nn.Module            # what the step calls: the model, compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    lrs: np.ndarray               # the learning rate of every step
    loader: object                # .batches(start, end) -> (x: (m*N, 3, S, S) ordered [view 1; view 2; ...], y)
    device: torch.device
    criterion: Criterion          # (z: (m*N, d), step) -> (loss, contrastive accuracy): the --loss
    amp_dtype: Optional[torch.dtype]
    guard: DivergenceGuard        # --on_nan: whether a step's values allow its update
    multiplier: int               # --multiplier: views per image, the m of x's m*N rows
    grad_cache_chunks: int        # --grad_cache_chunks: > 1 embeds and back-propagates the batch in chunks
    probe: Optional[Probe] = None  # the online linear probe (--online_probe)
    channels_last: bool = False   # --channels_last resolved for the device (auto: runtime.fast_compute)
    compile: bool = False         # --compile resolved for the device (auto: on for CUDA)
    compile_fallback: bool = False  # --compile auto: a compile failure falls back to eager (:class:`EagerFallback`)

    @property
    def compute(self) -> dict:
        """The resolved precision and layout, as env.json and checkpoints record them."""
        return {"precision": precision_name(self.amp_dtype), "channels_last": self.channels_last}


def build(cfg: PretrainConfig, images, device: torch.device, rank: int = 0, world: int = 1,
          foreach: Optional[bool] = None, loader: Optional[object] = None) -> Parts:
    """Model, optimizer, schedule, scaler, batch source and guard for ``cfg`` on ``images`` (not yet wrapped), with
    the options the step reads resolved into the :class:`Parts`. ``foreach`` picks the multi-tensor LARS (default:
    on CUDA); ``loader`` replaces the config's batch source."""
    channels_last = channels_last_on(cfg.channels_last, device)
    compiled = switch_on(cfg.compile, device.type == "cuda")
    model = build_model(cfg, images.image_size).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and cfg.sync_bn:  # CPU/gloo too; compiled: our own batch norm (SyncBatchNorm breaks the graph)
        model = convert_sync_batchnorm(model, device, compiled=compiled)
    optimizer = build_optimizer(model, cfg.opt, cfg.lr, cfg.weight_decay, cfg.lars_exclude,
                                foreach=device.type == "cuda" if foreach is None else foreach)
    amp = autocast_dtype(cfg.precision, device)
    return Parts(model=model, forward=model, optimizer=optimizer, criterion=build_criterion(cfg),
                 scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
                 lrs=lr_schedule(scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling), cfg.iters, cfg.lr_schedule,
                                 cfg.warmup),
                 loader=loader if loader is not None else build_loader(cfg, images, device, rank, world),
                 device=device, amp_dtype=amp, guard=DivergenceGuard(cfg.on_nan, device),
                 multiplier=cfg.multiplier, grad_cache_chunks=cfg.grad_cache_chunks,
                 probe=build_probe(cfg, images, model.feat_dim, device),
                 channels_last=channels_last, compile=compiled, compile_fallback=cfg.compile == "auto")


def wrap(p: Parts, distributed_run: bool) -> None:
    """The module the step calls: DDP-wrapped with several processes, then compiled (``--compile``):
    ``compile(DDP(model))``, the documented order, which lets DDP overlap its all-reduce with the backward pass.
    With ``--compile auto`` a compile failure falls back to eager with one warning (:class:`EagerFallback`)."""
    forward: nn.Module = p.model
    if distributed_run:
        forward = nn.parallel.DistributedDataParallel(
            forward, device_ids=[p.device.index] if p.device.type == "cuda" else None)
    if p.compile:
        forward = EagerFallback(forward) if p.compile_fallback else torch.compile(forward)
    p.forward = forward
    if p.probe is not None:
        p.probe.wrap(distributed_run, p.device)


class EagerFallback(nn.Module):
    """``torch.compile(module)`` that runs ``module`` itself, from then on, when compiling fails (with one warning).

    torch.compile compiles on a call (the first, and again when shapes or the grad mode change), so failures show
    there: the first call falls back on any error (an error eager also hits is then raised by the eager call);
    later calls only on torch.compile's own errors. Every process compiles the same code, so they fall back
    together. Parameters are those of ``module`` (it is not registered twice)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module, self.called = module, False
        try:
            self.compiled: Optional[nn.Module] = torch.compile(module)
        except Exception as e:  # e.g. a platform torch.compile does not support
            self.compiled = None
            self._fall_back(e)

    def _fall_back(self, e: BaseException) -> None:
        self.compiled = None
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning(f"warning: torch.compile failed ({type(e).__name__}: {why[:200]}); training continues eager "
                    f"(pass --compile false to skip compiling, --compile true to stop on this error)")

    def forward(self, *args, **kwargs):
        if self.compiled is not None:
            first, self.called = not self.called, True
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:
                if not (first or _is_compile_error(e)):
                    raise
                self._fall_back(e)
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):  # no_sync() and the like of the wrapped module
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def _is_compile_error(e: BaseException) -> bool:
    from torch._dynamo.exc import TorchDynamoException
    return isinstance(e, TorchDynamoException) or type(e).__module__.startswith(("torch._inductor", "torch._dynamo"))


def forward_backward(p: Parts, x: torch.Tensor, step: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The loss (``p.criterion`` at optimizer step ``step``) of the views ``x`` and its gradient in ``.grad``
    (scaled for fp16) -> (loss, accuracy, h of the first view ``(N, d)``), detached. The network runs under
    autocast; the loss is fp32. With ``grad_cache_chunks`` the batch is embedded and back-propagated chunk by chunk
    (same gradient, a chunk's activation memory; ``h`` then comes from the graph-free pass, and only when the probe
    needs it)."""
    if p.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    n = x.shape[0] // p.multiplier
    if p.grad_cache_chunks > 1:
        chunks: list = []
        loss, acc = grad_cache_backward(p.forward, x, p.criterion, p.multiplier, p.grad_cache_chunks,
                                        p.amp_dtype, scale=p.scaler.scale,
                                        on_h=chunks.append if p.probe is not None else None, step=step)
        h = None
        if chunks:
            h = torch.empty(x.shape[0], chunks[0][1].shape[1], device=x.device, dtype=chunks[0][1].dtype)
            for rows, hc in chunks:
                h[rows] = hc
            h = h[:n]
        return loss, acc, h
    with torch.autocast(x.device.type, dtype=p.amp_dtype, enabled=p.amp_dtype is not None):
        out = p.forward(x)
    loss, acc = p.criterion(out["z"], step)
    p.scaler.scale(loss).backward()
    return loss.detach(), acc.detach(), out["h"][:n].detach()


class DivergenceGuard:
    """What a non-finite loss or gradient norm does to a step (the loop records what it decided:
    :func:`simclr.train.loop.record_skip`, :func:`simclr.train.loop.stop_if_diverged`).

    ``stop``: the first bad step is recorded on the device (no host sync per step) and read by
    :meth:`first_bad` at log, eval and save points, so no checkpoint is ever written after it.
    ``skip``: decided at once (one sync per step): no update, batch-norm statistics restored.
    With fp16 loss scaling the scaler already skips overflowing gradients, so only the loss counts.
    """

    def __init__(self, policy: str, device: torch.device):
        self.policy = policy
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self._buffers: list = []

    def before(self, model: nn.Module) -> None:
        if self.policy == "skip":  # the forward pass changes running statistics: keep a copy to undo
            self._buffers = [b.detach().clone() for b in model.buffers()]

    def allows_update(self, loss: torch.Tensor, p: Parts, step: int) -> bool:
        bad = ~torch.isfinite(loss)
        if not p.scaler.is_enabled():
            grads = [q.grad for q in p.model.parameters() if q.grad is not None]
            if grads:
                bad = bad | ~torch.stack(torch._foreach_norm(grads)).isfinite().all()
        if self.policy == "stop":
            self._first_bad = torch.where(bad & (self._first_bad < 0), step, self._first_bad)
            return True
        if not bool(bad):
            return True
        p.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, old in zip(p.model.buffers(), self._buffers):
                b.copy_(old)
        return False

    def first_bad(self) -> int:
        """The first non-finite step on any rank, -1 if none (a collective: call it on every rank)."""
        return int(distributed.all_reduce_max(self._first_bad)) if self.policy == "stop" else -1


def train_step(p: Parts, x: torch.Tensor, step: int, *, y: Optional[torch.Tensor] = None,
               lr: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Optimizer step ``step`` on the views ``x: (m*N, 3, S, S)`` -> (loss, contrastive accuracy, updated);
    ``updated`` is False for a step ``p.guard`` skipped. With labels ``y: (N,)`` the online probe (if any) takes its
    step on the first view's detached ``h``. ``lr`` replaces the schedule's rate (a benchmark's wall-clock one)."""
    set_lr(p.optimizer, float(p.lrs[step]) if lr is None else lr)
    p.optimizer.zero_grad(set_to_none=True)
    p.guard.before(p.model)
    loss, acc, h = forward_backward(p, x, step)
    updated = p.guard.allows_update(loss, p, step)
    if updated:
        p.scaler.step(p.optimizer)
        p.scaler.update()
        if p.probe is not None and y is not None and h is not None:
            p.probe.step(h, y)
    return loss, acc, updated
