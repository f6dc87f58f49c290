"""ResNet encoders built from torchvision's residual blocks: depths 18 to 200, any width.

Why not ``torchvision.models.resnet50()`` directly: SimCLR needs (a) the CIFAR stem
(3x3 conv, stride 1, no max-pool) and (b) the official code's width multiplier (every channel
count times k: ResNet-50 x2 and x4 of the SimCLR papers), which torchvision's constructor does
not offer (its ``wide_resnet50_2`` widens only the 3x3 convolution inside each bottleneck). The module and
parameter names below are exactly torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1`` ...), minus ``fc``, so our
state dicts load into ``torchvision.models.resnetXX()`` (18 to 152, width 64) and the spec's checkpoints load
into ours.
"""
from __future__ import annotations

import re

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

# name -> (block, blocks per stage); resnet200 is the official SimCLR code's (torchvision has none)
ENCODERS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
    "resnet200": (Bottleneck, (3, 24, 36, 3)),
}
BASE_WIDTH = 64  # channels of the first stage of a standard ResNet: width multiplier k means BASE_WIDTH * k
_WIDE = re.compile(r"^(resnet\d+)x(\d+)$")


def split_arch(arch: str) -> tuple[str, int]:
    """The papers' spelling ``resnet50x2`` -> ``('resnet50', 2)``; ``resnet50`` -> ``('resnet50', 0)`` (0: no
    multiplier written)."""
    m = _WIDE.match(arch)
    return (m.group(1), int(m.group(2))) if m else (arch, 0)


def resolve_width(arch: str, width: int = 0, width_multiplier: int = 0) -> tuple[str, int]:
    """(ResNet name, channels of the first stage) from the three ways a width is written: ``--width C``
    (channels of the first stage), ``--width_multiplier k`` and the arch suffix ``x k`` (both: C = 64 k).
    0 means "not given"; nothing given is the standard width 64. Ways that disagree raise ValueError."""
    base, k_arch = split_arch(arch)
    if k_arch and width_multiplier and k_arch != width_multiplier:
        raise ValueError(f"--arch {arch} means width multiplier {k_arch} but --width_multiplier is "
                         f"{width_multiplier}; give one of them")
    k = k_arch or width_multiplier
    if k and width and width != BASE_WIDTH * k:
        raise ValueError(f"--width {width} and width multiplier {k} (--arch {arch} / --width_multiplier) disagree: "
                         f"multiplier k is width {BASE_WIDTH} x k = {BASE_WIDTH * k}; give one of them")
    return base, width or BASE_WIDTH * (k or 1)


def arch_name(arch: str, width: int) -> str:
    """How a ResNet is named in tables: ``resnet50x2`` for width 128; the plain name for width 64 and for widths
    that are not a multiple of 64 (tiny test models, whose width is shown beside)."""
    k, rest = divmod(width, BASE_WIDTH)
    return f"{arch}x{k}" if k > 1 and rest == 0 else arch


class ResNet(nn.Module):
    """ResNet trunk: image (N, 3, H, W) in [0, 1] -> representation h (N, feat_dim).

    ``cifar_stem=True`` replaces the 7x7/stride-2 conv + max-pool with a 3x3/stride-1 conv,
    as SimCLR does for 32 px (and the spec for CIFAR) inputs.
    """

    def __init__(self, arch: str = "resnet50", cifar_stem: bool = False, width: int = 64):
        super().__init__()
        if arch not in ENCODERS:
            raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ENCODERS)}")
        block, layers = ENCODERS[arch]
        self.arch, self.cifar_stem, self.width = arch, cifar_stem, width
        self.inplanes = width
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = width * 8 * block.expansion

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)
