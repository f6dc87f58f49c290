"""Model builder: encoder (ResNet), projection head, the SimCLR module that joins them, and global BN."""
from __future__ import annotations

import math

import torch
from torch import nn

from .batchnorm import GlobalBatchNorm, convert_sync_batchnorm
from .head import ProjectionHead
from .resnet import ENCODERS, ResNet

__all__ = ["ENCODERS", "GlobalBatchNorm", "ResNet", "ProjectionHead", "SimCLRModel", "build_model",
           "convert_sync_batchnorm", "init_weights", "zero_init_last_bn"]


class SimCLRModel(nn.Module):
    """Encoder f and projection head g. ``forward(x)`` returns ``{"h": (N, d), "z": (N, proj_dim)}``.

    Attribute names ``convnet`` and ``projection`` mirror the spec's checkpoint keys.
    """

    def __init__(self, arch: str = "resnet50", cifar_stem: bool = True, width: int = 64,
                 proj_layers: int = 2, proj_dim: int = 128, zero_init_residual: bool = False):
        super().__init__()
        self.convnet = ResNet(arch, cifar_stem=cifar_stem, width=width)
        self.projection = ProjectionHead(self.convnet.feat_dim, proj_dim, proj_layers)
        init_weights(self)
        if zero_init_residual:
            zero_init_last_bn(self.convnet)

    @property
    def feat_dim(self) -> int:
        return self.convnet.feat_dim

    def forward(self, x: torch.Tensor) -> dict:
        h = self.convnet(x)
        return {"h": h, "z": self.projection(h)}

    def encode(self, x: torch.Tensor, layer: str = "h") -> torch.Tensor:
        """Representation for evaluation: ``h`` or the output of head block k (``layer='g1'``, ``'g2'``...)."""
        h = self.convnet(x)
        if layer == "h":
            return h
        if layer.startswith("g") and layer[1:].isdigit():
            return self.projection(h, upto=int(layer[1:]))
        if layer == "z":
            return self.projection(h)
        raise ValueError(f"encode layer must be h, z or g1..g{self.projection.layers}, got {layer!r}")


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """The official SimCLR initialisation, applied to every module of ``model``.

    Conv kernels: truncated normal (cut at 2 std) with TF's variance-scaling std
    sqrt(1 / fan_in) / 0.8796 (fan_in = in_channels * kh * kw; the constant makes the
    truncated distribution's std equal sqrt(1 / fan_in)). Linear weights: N(0, 0.01^2).
    BN: weight 1, bias 0 (PyTorch's default).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
            std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
            nn.init.trunc_normal_(m.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@torch.no_grad()
def zero_init_last_bn(encoder: nn.Module) -> None:
    """The official SimCLR ResNet's zero-init residual: the last BN gamma of every residual block
    (bn2 of a BasicBlock, bn3 of a Bottleneck) starts at 0, so each block starts as the identity."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    for m in encoder.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)


def build_model(cfg, image_size: int) -> SimCLRModel:
    """The CIFAR stem for small inputs (32 px CIFAR, 96 px STL-10), the ImageNet stem above."""
    return SimCLRModel(arch=cfg.arch, cifar_stem=image_size <= 96, width=cfg.width,
                       proj_layers=cfg.proj_layers, proj_dim=cfg.proj_dim,
                       zero_init_residual=bool(getattr(cfg, "zero_init_residual", False)))
