"""The online linear probe (as solo-learn runs one): a linear classifier on the detached ``h`` of each step's first
view, trained alongside pretraining with its own optimizer, so a run shows how linearly separable its features
are while it trains. It never reaches the encoder: ``h`` is detached and the probe has its own optimizer.

Under DDP the head is wrapped like the model: its gradients are averaged over the processes, so every process
holds the same head (the one rank 0 checkpoints). Training images without a label (STL-10's unlabeled split,
label -1) are left out of its loss and its accuracy.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..errors import UserError


class Probe:
    """A linear head (zero-initialised, as the linear evaluation's: it draws no random numbers, so the run's
    random streams are those of a run without it) and its SGD (momentum 0.9, constant ``lr``)."""

    def __init__(self, feat_dim: int, n_classes: int, lr: float, device: torch.device):
        self.head = nn.Linear(feat_dim, n_classes).to(device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.forward: nn.Module = self.head
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=lr, momentum=0.9)
        self.window = torch.zeros(2, dtype=torch.float64, device=device)  # (correct, labelled) since the last read

    def wrap(self, distributed_run: bool, device: torch.device) -> None:
        if distributed_run:
            self.forward = nn.parallel.DistributedDataParallel(
                self.head, device_ids=[device.index] if device.type == "cuda" else None)

    def step(self, h: torch.Tensor, y: torch.Tensor) -> None:
        """One update on features ``h: (N, d)`` (detached here) with labels ``y: (N,)`` (-1 = none). The
        accuracy is counted before the update, from the logits the update starts from. No host sync."""
        logits = self.forward(h.detach().float())
        labelled = y >= 0
        target = y.clamp(min=0)
        n = labelled.sum()
        # mean over the labelled rows only; a batch without any gives a zero loss, not NaN
        loss = (F.cross_entropy(logits, target, reduction="none") * labelled).sum() / n.clamp(min=1)
        with torch.no_grad():
            self.window += torch.stack([((logits.argmax(1) == target) & labelled).sum(), n]).double()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def window_top1(self) -> Optional[float]:
        """Top-1 in percent over the steps since the last call, all processes together (a collective: call it on
        every rank); None when no labelled image was seen."""
        correct, n = distributed.all_reduce_mean(self.window).tolist()
        self.window.zero_()
        return 100.0 * correct / n if n > 0 else None

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])


def build_probe(cfg, images, feat_dim: int, device: torch.device) -> Optional[Probe]:
    """The probe ``--online_probe`` asks for, or None; refused when the pretraining images carry no labels."""
    if not cfg.online_probe:
        return None
    n_classes = len(getattr(images, "classes", None) or [])
    if n_classes < 2 or not any(t >= 0 for t in images.targets):
        raise UserError(f"--online_probe true needs class labels, but the pretraining images of --data {cfg.data} "
                        f"have none ({n_classes} class(es)); pretrain on labelled images (e.g. an image folder "
                        f"with one sub-folder per class) or pass --online_probe false")
    return Probe(feat_dim, n_classes, cfg.online_probe_lr, device)
