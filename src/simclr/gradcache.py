"""Gradient caching: the contrastive loss's gradient of a large batch, computed in K chunks.

NT-Xent (like DCL) couples every row of the batch through the softmax denominators, so the batch
cannot simply be split into independent micro-batches. It can be split in two stages
(Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"):

1. embed every chunk without building a graph -> z (all rows, cheap in memory);
2. compute the loss on z with a graph over z only and take dL/dz for all rows;
3. re-run each chunk with a graph and back-propagate ``dL/dz[chunk]`` through it.

The parameter gradients are those of the one-shot batch; peak activation memory is that
of one chunk. The price is one extra forward pass (about +30% compute).

Chunks are cut by image, not by row: chunk c holds images [c*B/K, (c+1)*B/K) in every one
of the m views, so each chunk has both views of its images.

Batch norm: in training mode each chunk normalises with its own statistics (B/K images x
m views), so the result equals the one-shot batch only when BN does not use batch
statistics (eval mode, frozen BN) — which is what the test checks (within 1e-5). With
trained BN it behaves like the paper's per-device BN on K devices ("local" BN, not
synchronised), a small change to the objective. The running statistics are updated once
per chunk (during the graph pass; the graph-free pass restores them), i.e. K updates per
step instead of one.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Union

import torch
from torch import nn

from .errors import ConfigError
from .loss import Contrastive, Criterion


def chunk_rows(n_images: int, multiplier: int, chunks: int, device=None) -> list:
    """Row indices of each chunk in a (m*B, ...) batch ordered [view 1; view 2; ...]."""
    if chunks < 1 or n_images % chunks:
        raise ConfigError(f"grad_cache_chunks {chunks} must divide the per-process batch of {n_images} images")
    per = n_images // chunks
    base = torch.arange(multiplier, device=device).unsqueeze(1) * n_images
    return [(base + torch.arange(c * per, (c + 1) * per, device=device)).reshape(-1) for c in range(chunks)]


def _bn_buffers(model: nn.Module) -> list:
    return [(m, {k: getattr(m, k).clone() for k in ("running_mean", "running_var", "num_batches_tracked")
                 if getattr(m, k, None) is not None})
            for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _restore(saved: list) -> None:
    for m, bufs in saved:
        for k, v in bufs.items():
            getattr(m, k).copy_(v)


def grad_cache_backward(model: nn.Module, x: torch.Tensor, criterion: Union[Criterion, float], multiplier: int,
                        chunks: int, autocast_dtype: Optional[torch.dtype] = None,
                        scale: Callable[[torch.Tensor], torch.Tensor] = lambda g: g,
                        on_h: Optional[Callable[[tuple], None]] = None, step: int = 0,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate into ``.grad`` the gradient of ``criterion(z, step)`` over the whole batch, chunk by chunk.

    criterion: a :mod:`simclr.loss` criterion ``(z: (m*B, d), step) -> (loss, acc)``, or a number: NT-Xent at
    that temperature.

    model: returns ``{"z": (rows, d)}`` (a DDP wrapper is fine: gradients are all-reduced once,
    on the last chunk). x: (m*B, 3, S, S) ordered [view 1; view 2; ...]. ``scale`` maps the
    cached gradient before back-propagation (a GradScaler's ``scale`` for fp16). ``on_h`` is handed
    ``(rows, h)`` of every chunk's graph-free pass (the online probe's features).
    Returns (loss, acc), detached.
    """
    if not callable(criterion):
        criterion = Contrastive("nt_xent", criterion, multiplier)
    n = x.shape[0] // multiplier
    rows = chunk_rows(n, multiplier, chunks, x.device)
    dev = x.device.type
    amp = dict(device_type=dev, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    saved = _bn_buffers(model)
    z_parts = []
    with torch.no_grad(), torch.autocast(**amp):
        for r in rows:
            out = model(x[r])
            z_parts.append(out["z"].float())
            if on_h is not None:
                on_h((r, out["h"]))
    _restore(saved)  # the graph pass below updates the running statistics, once per chunk
    z = torch.empty(x.shape[0], z_parts[0].shape[1], device=x.device, dtype=torch.float32)
    for r, part in zip(rows, z_parts):
        z[r] = part
    z.requires_grad_(True)
    loss, acc = criterion(z, step)
    (grad,) = torch.autograd.grad(loss, z)
    grad = scale(grad)
    sync = getattr(model, "no_sync", None)
    for c, r in enumerate(rows):
        last = c == len(rows) - 1
        with (contextlib.nullcontext() if last or sync is None else sync()):
            with torch.autocast(**amp):
                zc = model(x[r])["z"]
            zc.float().backward(grad[r])
    return loss.detach(), acc.detach()
