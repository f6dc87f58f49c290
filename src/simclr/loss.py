"""NT-Xent, the SimCLR contrastive loss, for m >= 2 views and any number of processes.

Written by hand because no library computes it the way SimCLR needs: m views per image,
the spec's averaging over every (anchor, positive) pair, and negatives gathered from all
processes with a gradient-carrying all-gather.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def nt_xent(z: torch.Tensor, temperature: float, multiplier: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent loss and contrastive accuracy.

    z: (m*N, d) projections of this process's N images, ordered [view 1 of all N images;
       view 2; ...; view m].
    Returns (loss, acc), both scalars (fp32).

    loss = mean over this process's m*N anchors and each anchor's m-1 positives of
    -log softmax_j(sim(anchor, j) / T) at the positive, the softmax running over every
    other row of the global batch (self excluded). Under a process group of size W the
    columns are the projections of all W processes (each view's images in rank order),
    so the mean over ranks of the returned losses is the single-process loss on the global
    batch, and DDP's gradient averaging yields the single-process gradient.
    (``z.grad`` itself is W times the matching rows of the global gradient, because the
    all-gather's backward sums the contributions of all ranks; DDP then divides by W.)

    acc = fraction of anchors whose m-1 most similar other rows are exactly its positives.
    """
    m = multiplier
    if z.dim() != 2 or z.shape[0] % m != 0:
        raise ValueError(f"z must be (multiplier*N, d) with multiplier={m}; got shape {tuple(z.shape)}")
    n = z.shape[0] // m
    world, rank = _world()
    # fp32 and no autocast: the logits/T and log-softmax overflow or lose precision in bf16/fp16.
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=1)
        if world > 1:
            from torch.distributed.nn.functional import all_gather
            parts = all_gather(z)  # W tensors of (m*n, d), gradient flows back to every rank
            cols = torch.cat([p.view(m, n, -1) for p in parts], dim=1).reshape(m * world * n, -1)
        else:
            cols = z
        big_n = world * n  # global images per view
        rows = torch.arange(m * n, device=z.device)
        view = torch.div(rows, n, rounding_mode="floor")  # (m*n,) view of each local row
        image = rank * n + rows % n  # (m*n,) global image index
        self_col = view * big_n + image  # column holding the anchor itself

        logits = (z @ cols.t()) / temperature  # (m*n, m*W*n)
        # the anchor's own column out of the softmax, by index: no (m*n, m*W*n) mask, no host sync
        logits = logits.index_put((rows, self_col), logits.new_full((), float("-inf")))
        logprob = F.log_softmax(logits, dim=1)

        # positives of row i: the same image in every other view, views j < view(i) as j and the rest as j + 1
        others = torch.arange(m - 1, device=z.device).unsqueeze(0)
        others = others + (others >= view.unsqueeze(1)).long()  # (m*n, m-1)
        pos_cols = others * big_n + image.unsqueeze(1)
        loss = -logprob.gather(1, pos_cols).mean()

        with torch.no_grad():
            top = logits.topk(m - 1, dim=1).indices.sort(dim=1).values
            acc = (top == pos_cols.sort(dim=1).values).all(dim=1).float().mean()
    return loss, acc


def nt_xent_loss(z: torch.Tensor, temperature: float, multiplier: int = 2) -> torch.Tensor:
    """The NT-Xent loss alone (see :func:`nt_xent`). z: (m*N, d) ordered [view 1; view 2; ...]."""
    return nt_xent(z, temperature, multiplier)[0]
