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

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

# name -> (block, blocks per stage), the names of simclr.names.RESNETS; resnet200 is the official SimCLR code's
# (torchvision has none)
ENCODERS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
    "resnet200": (Bottleneck, (3, 24, 36, 3)),
}


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
