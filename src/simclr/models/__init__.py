"""Model builder: encoder (a ResNet, or any timm model), projection head, the SimCLR module that joins them, and
global BN."""
from __future__ import annotations

import importlib
import math
from typing import Optional

import torch
from torch import nn

from ..names import BACKBONES, BASE_WIDTH, arch_name, is_named, is_timm, parse_kwargs, resolve_width, split_arch
from .batchnorm import GlobalBatchNorm, convert_sync_batchnorm
from .head import ProjectionHead
from .resnet import ENCODERS, ResNet

__all__ = ["BASE_WIDTH", "ENCODERS", "GlobalBatchNorm", "ResNet", "ProjectionHead", "SimCLRModel", "arch_name",
           "build_model", "convert_sync_batchnorm", "init_weights", "is_named", "is_timm", "named_trunk",
           "register_backbone", "resolve_width", "split_arch", "zero_init_last_bn"]


class SimCLRModel(nn.Module):
    """Encoder f and projection head g. ``forward(x)`` returns ``{"h": (N, d), "z": (N, proj_dim)}``.

    Attribute names ``convnet`` and ``projection`` mirror the spec's checkpoint keys. ``arch`` is a ResNet
    (``resnet18`` ... ``resnet200``, ``resnet50x2`` for a width multiplier) of ``width`` first-stage channels
    (0: 64 times the arch's multiplier), or ``timm:<model name>``: then ``convnet`` is the headless timm model
    itself (timm's own parameter names), built with ``timm_kwargs`` and, where the model takes it,
    ``img_size=image_size``; ``cifar_stem``, ``width`` and ``zero_init_residual`` are the ResNets' only.
    Attributes ``arch``, ``width`` (0 for timm), ``cifar_stem``, ``timm_kwargs`` (what the trunk was created
    with, ``img_size`` included) describe the encoder.
    """

    def __init__(self, arch: str = "resnet50", cifar_stem: bool = True, width: int = 0,
                 proj_layers: int = 2, proj_dim: int = 128, zero_init_residual: bool = False,
                 timm_kwargs: Optional[dict] = None, image_size: Optional[int] = None, width_multiplier: int = 0):
        super().__init__()
        if is_named(arch):
            self.convnet, self.timm_kwargs, self._feat_dim = named_trunk(arch, timm_kwargs, image_size)
            self.arch, self.width, self.cifar_stem = arch, 0, False
        else:
            if timm_kwargs:
                raise ValueError(f"timm_kwargs apply to timm: archs and BACKBONES only, not {arch}")
            self.arch, width = resolve_width(arch, width, width_multiplier)  # the one place a model's width is read
            self.convnet = ResNet(self.arch, cifar_stem=cifar_stem, width=width)
            self.width, self.cifar_stem, self.timm_kwargs = width, cifar_stem, {}
            self._feat_dim = self.convnet.feat_dim
        self.projection = ProjectionHead(self._feat_dim, proj_dim, proj_layers)
        # the official SimCLR initialisation is a ResNet's; a named trunk keeps the initialisation it is built with
        init_weights(self.projection if is_named(arch) else self)
        if zero_init_residual:
            if is_named(arch):
                raise ValueError("zero_init_residual applies to the built-in ResNets; for a timm model pass its own "
                                 "argument in timm_kwargs (e.g. zero_init_last for timm ResNets)")
            zero_init_last_bn(self.convnet)

    @property
    def feat_dim(self) -> int:
        return self._feat_dim

    @property
    def name(self) -> str:
        """``resnet50x2``, ``timm:vit_tiny_patch16_224``: the encoder as tables name it."""
        return self.arch if is_named(self.arch) else arch_name(self.arch, self.width)

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


def named_trunk(arch: str, kwargs: Optional[dict], image_size: Optional[int]) -> tuple[nn.Module, dict, int]:
    """(trunk, the keyword arguments it was built with, its feature size) of a timm model or one of
    :data:`simclr.names.BACKBONES`."""
    if is_timm(arch):
        from .timm_trunk import create, feat_dim
        trunk, kw = create(arch, kwargs, image_size)
        return trunk, kw, feat_dim(trunk)
    factory = BACKBONES[arch]
    if isinstance(factory, str):
        module, _, name = factory.partition(":")
        factory = getattr(importlib.import_module(module), name)
    trunk = factory(image_size=image_size, **(kwargs or {}))
    return trunk, dict(kwargs or {}), int(trunk.feat_dim)


def register_backbone(name: str, factory) -> None:
    """Make ``factory`` (see :data:`simclr.names.BACKBONES`) the encoder of ``--arch name``, from a script that then
    starts the run (or loads its checkpoints: a process builds only the backbones it knows)."""
    if not name or name != name.lower() or name.startswith("timm:") or split_arch(name)[0] in ENCODERS:
        raise ValueError(f"backbone name {name!r}: a new lower-case name, not a ResNet's or a timm: one")
    BACKBONES[name] = factory


def build_model(cfg, image_size: int) -> SimCLRModel:
    """The model a pretraining config describes, for inputs of ``image_size`` px. ResNets get the CIFAR stem for
    small inputs (32 px CIFAR, 96 px STL-10), the ImageNet stem above; a timm model is built as timm makes it."""
    arch = cfg.arch
    if is_named(arch):
        return SimCLRModel(arch=arch, proj_layers=cfg.proj_layers, proj_dim=cfg.proj_dim,
                           timm_kwargs=parse_kwargs(getattr(cfg, "timm_kwargs", "")), image_size=image_size)
    return SimCLRModel(arch=arch, cifar_stem=image_size <= 96, width=cfg.width,
                       width_multiplier=getattr(cfg, "width_multiplier", 0),
                       proj_layers=cfg.proj_layers, proj_dim=cfg.proj_dim,
                       zero_init_residual=bool(getattr(cfg, "zero_init_residual", False)))
