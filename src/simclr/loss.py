"""The contrastive losses (NT-Xent, the default, and DCL), for m >= 2 views and any number of processes, and the
one seam the training step calls: a *criterion* ``criterion(z, step) -> (loss, accuracy)``, built once from the
config by :func:`build_criterion`.

Written by hand because no library computes them the way SimCLR needs: m views per image, the spec's averaging
over every (anchor, positive) pair, and negatives gathered from all processes with a gradient-carrying
all-gather. A new loss is a function here and one :func:`register_loss` line (docs/extending.md); a loss kept
outside the package registers itself the same way before the run is parsed.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

Criterion = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _logits(z: torch.Tensor, temperature: float, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities of this process's rows against the global batch, in fp32 (call it with autocast off).

    z: (m*n, d) ordered [view 1; view 2; ...]. Returns logits (m*n, m*W*n): cosine similarity / T, the anchor's own
    column at -inf; and pos_cols (m*n, m-1): the columns of each row's positives (the same image in the other
    views). Under a process group of size W the columns are the projections of all W processes (each view's images
    in rank order)."""
    if z.dim() != 2 or z.shape[0] % m != 0:
        raise ValueError(f"z must be (multiplier*N, d) with multiplier={m}; got shape {tuple(z.shape)}")
    n = z.shape[0] // m
    world, rank = _world()
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

    # positives of row i: the same image in every other view, views j < view(i) as j and the rest as j + 1
    others = torch.arange(m - 1, device=z.device).unsqueeze(0)
    others = others + (others >= view.unsqueeze(1)).long()  # (m*n, m-1)
    return logits, others * big_n + image.unsqueeze(1)


def _accuracy(logits: torch.Tensor, pos_cols: torch.Tensor, m: int) -> torch.Tensor:
    """Fraction of anchors whose m-1 most similar other rows are exactly its positives."""
    with torch.no_grad():
        top = logits.topk(m - 1, dim=1).indices.sort(dim=1).values
        return (top == pos_cols.sort(dim=1).values).all(dim=1).float().mean()


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
    # fp32 and no autocast: the logits/T and log-softmax overflow or lose precision in bf16/fp16.
    with torch.autocast(device_type=z.device.type, enabled=False):
        logits, pos_cols = _logits(z, temperature, m)
        logprob = F.log_softmax(logits, dim=1)
        loss = -logprob.gather(1, pos_cols).mean()
        acc = _accuracy(logits, pos_cols, m)
    return loss, acc


def nt_xent_loss(z: torch.Tensor, temperature: float, multiplier: int = 2) -> torch.Tensor:
    """The NT-Xent loss alone (see :func:`nt_xent`). z: (m*N, d) ordered [view 1; view 2; ...]."""
    return nt_xent(z, temperature, multiplier)[0]


def dcl(z: torch.Tensor, temperature: float, multiplier: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled contrastive loss (Yeh et al., ECCV 2022) and the contrastive accuracy of :func:`nt_xent`.

    z: (m*N, d) ordered [view 1 of all N images; view 2; ...; view m]. Returns (loss, acc), scalars (fp32).

    loss = mean over this process's m*N anchors i and each of its m-1 positives p of
    -sim(i, p) / T + log sum_k exp(sim(i, k) / T), the sum running over the negatives of i only: every row of the
    global batch that is neither i nor a view of i's image. NT-Xent's denominator also holds the positive; taking
    it out removes the factor that shrinks the gradient when the positive is already close (the "negative-positive
    coupling"); the paper reports it makes training much less sensitive to the batch size. The global batch must
    hold >= 2 images. The distributed form and its gradient contract are those of :func:`nt_xent`.
    """
    m = multiplier
    with torch.autocast(device_type=z.device.type, enabled=False):
        logits, pos_cols = _logits(z, temperature, m)
        if logits.shape[1] <= m:
            raise ValueError(f"DCL needs >= 2 images in the global batch (negatives); got {logits.shape[1] // m}")
        negatives = logits.scatter(1, pos_cols, float("-inf"))  # (m*n, m*W*n): self and positives out
        loss = (negatives.logsumexp(dim=1, keepdim=True) - logits.gather(1, pos_cols)).mean()
        acc = _accuracy(logits, pos_cols, m)
    return loss, acc


# --------------------------------------------------------------------------------------------
# the criterion: the loss the step calls, built once from the config
# --------------------------------------------------------------------------------------------
class Contrastive:
    """``criterion(z, step) -> (loss, acc)`` for one of the pairwise losses above at a fixed temperature.

    z: (m*N, d) this process's projections ordered [view 1 of all N images; view 2; ...]; step: the optimizer step
    (unused here: a loss with a schedule reads it). Returns (loss, acc), fp32 scalars; ``loss`` carries the graph."""

    def __init__(self, loss: str, temperature: float, multiplier: int):
        self.loss, self.temperature, self.multiplier = loss, temperature, multiplier

    def __call__(self, z: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # looked up at each call: a test (or a notebook) may replace simclr.loss.nt_xent to inject a fault
        return globals()[self.loss](z, self.temperature, self.multiplier)

    def __repr__(self) -> str:
        return f"{self.loss}(temperature={self.temperature}, multiplier={self.multiplier})"


# --loss name -> factory(cfg) -> criterion. The config's fields are read by name (cfg.temperature, cfg.multiplier):
# this layer knows no schema.
LOSSES: dict = {}


def register_loss(name: str, factory: Callable[[object], Criterion]) -> None:
    """Make ``--loss NAME`` build ``factory(cfg)``: a callable ``criterion(z, step) -> (loss, acc)`` with z of shape
    (m*N, d) ordered [view 1; view 2; ...], loss a scalar with a graph, acc a detached scalar. Registering a name
    again replaces it."""
    if not isinstance(name, str) or not name or name != name.strip().lower():
        raise ValueError(f"a loss name is a non-empty lower-case word, got {name!r}")
    LOSSES[name] = factory


register_loss("nt-xent", lambda cfg: Contrastive("nt_xent", cfg.temperature, cfg.multiplier))
register_loss("dcl", lambda cfg: Contrastive("dcl", cfg.temperature, cfg.multiplier))


def build_criterion(cfg) -> Criterion:
    """The criterion of ``cfg.loss`` (a config without the option: NT-Xent)."""
    name = getattr(cfg, "loss", "nt-xent")
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)} (register others with "
                         f"simclr.loss.register_loss)")
    return LOSSES[name](cfg)
