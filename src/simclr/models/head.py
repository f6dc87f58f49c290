"""SimCLR projection head g(h) -> z."""
from __future__ import annotations

import torch
from torch import nn


class BatchNorm1dNoBias(nn.BatchNorm1d):
    """BatchNorm1d with a learnable scale but a bias fixed at zero, as the official head's last BN.

    The bias stays a registered (frozen) parameter so the state-dict keys match the spec's
    ``projection.bn2.{weight,bias,...}`` layout.
    """

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.bias.requires_grad_(False)


class ProjectionHead(nn.Module):
    """``proj_layers=2`` (SimCLR v1 / spec): fc1(d->d, no bias) -> bn1 -> ReLU -> fc2(d->out, no bias) -> bn2.

    ``proj_layers=3`` (SimCLR v2) inserts one more fc/bn/ReLU block: fc1 -> bn1 -> ReLU -> fc2 -> bn2
    -> ReLU -> fc3 -> bn3. Layer names follow the spec (``fc1``, ``bn1``, ...).
    """

    def __init__(self, in_dim: int, out_dim: int = 128, layers: int = 2):
        super().__init__()
        if layers not in (2, 3):
            raise ValueError(f"proj_layers must be 2 or 3, got {layers}")
        self.layers = layers
        dims = [in_dim] * layers + [out_dim]
        for i in range(1, layers + 1):
            self.add_module(f"fc{i}", nn.Linear(dims[i - 1], dims[i], bias=False))
            last = i == layers
            self.add_module(f"bn{i}", BatchNorm1dNoBias(dims[i]) if last else nn.BatchNorm1d(dims[i]))

    def forward(self, h: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Returns z; with ``upto=k`` returns the output of the k-th fc/bn/ReLU block instead
        (SimCLR v2 fine-tunes from the first head layer)."""
        x = h
        for i in range(1, self.layers + 1):
            x = getattr(self, f"bn{i}")(getattr(self, f"fc{i}")(x))
            if i < self.layers:
                x = torch.relu(x)
            if upto is not None and i == upto:
                return x
        return x
