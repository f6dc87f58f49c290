"""Weights as artifacts: load any encoder checkpoint (ours, the spec's, an export) as a module.

``load_encoder(path)`` -> :class:`Encoder`, an ``nn.Module`` in eval mode mapping images
(N, 3, H, W) with values in [0, 1] (no mean/std normalisation, as in the spec) to the
representation h (N, d).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .checkpoint import load_checkpoint, unwrap_state_dict
from .errors import CheckpointError
from .models import ENCODERS, SimCLRModel


class Encoder(nn.Module):
    """A loaded encoder: ``forward(x) -> h``; ``encode(x, layer)`` for head layers when present.

    Attributes: ``arch``, ``feat_dim``, ``input_size`` (the side it was trained on),
    ``cifar_stem``, ``model`` (the full :class:`SimCLRModel`, head included), ``source``
    (path) and ``info`` (config/hparams dict of the checkpoint).
    """

    def __init__(self, model: SimCLRModel, input_size: int, source: str = "", info: Optional[dict] = None,
                 has_head: bool = True):
        super().__init__()
        self.model = model
        self.arch = model.convnet.arch
        self.cifar_stem = model.convnet.cifar_stem
        self.feat_dim = model.feat_dim
        self.input_size = input_size
        self.source = source
        self.info = info or {}
        self.has_head = has_head
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.convnet(x)

    def encode(self, x: torch.Tensor, layer: str = "h") -> torch.Tensor:
        if layer != "h" and not self.has_head:
            raise CheckpointError(f"{self.source} holds no projection head; encode_layer must be h")
        return self.model.encode(x, layer)


def _spec_size(hp: dict) -> int:
    data = str(hp.get("data", "cifar")).lower()
    return 32 if data.startswith("cifar") else (96 if data.startswith("stl") else 224)


def _strict_load(model: nn.Module, sd: dict, path) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{path}: state dict does not match the architecture ({'; '.join(parts)})")


def _check_shapes(model: nn.Module, sd: dict, path) -> None:
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)} but the architecture expects "
                                  f"{tuple(own[k].shape)} (a checkpoint of another architecture or width?)")


def _guess_width_arch(sd: dict, prefix: str) -> tuple[str, int]:
    w = sd[f"{prefix}conv1.weight"].shape[0]
    bottleneck = f"{prefix}layer1.0.conv3.weight" in sd
    n3 = len({k.split(".")[1] for k in sd if k.startswith(f"{prefix}layer3.")})
    if bottleneck:
        return "resnet50", w
    return ("resnet34" if n3 == 6 else "resnet18"), w


def encoder_from_state(sd: dict, path, info: dict, input_size: Optional[int] = None, arch: Optional[str] = None,
                       width: Optional[int] = None) -> Encoder:
    """Build an Encoder from a state dict with ``convnet.*`` (+ optional ``projection.*``) keys."""
    sd = unwrap_state_dict(sd)
    if not any(k.startswith("convnet.") for k in sd):
        if "conv1.weight" in sd:  # a bare torchvision-style trunk (our export)
            sd = {f"convnet.{k}": v for k, v in sd.items()}
        else:
            raise CheckpointError(f"{path}: no encoder weights found (expected keys like convnet.conv1.weight)")
    sd = {k: v for k, v in sd.items() if not k.startswith("convnet.fc.")}
    g_arch, g_width = _guess_width_arch(sd, "convnet.")
    arch, width = arch or g_arch, width or g_width
    if arch not in ENCODERS:
        raise CheckpointError(f"{path}: unknown architecture {arch!r}")
    cifar_stem = sd["convnet.conv1.weight"].shape[-1] == 3
    has_head = any(k.startswith("projection.") for k in sd)
    proj_layers = len({k.split(".")[1] for k in sd if k.startswith("projection.fc")}) or 2
    proj_dim = sd["projection.fc%d.weight" % proj_layers].shape[0] if has_head else 128
    model = SimCLRModel(arch, cifar_stem=cifar_stem, width=width, proj_layers=proj_layers, proj_dim=proj_dim)
    if not has_head:
        own = model.state_dict()
        sd = dict(sd, **{k: v for k, v in own.items() if k.startswith("projection.")})
    _check_shapes(model, sd, path)
    _strict_load(model, sd, path)
    size = input_size or (32 if cifar_stem else 224)
    return Encoder(model, size, str(path), info, has_head)


def load_encoder(path, trust: bool = False, device="cpu") -> Encoder:
    """Load an encoder from our checkpoint, the spec's ``.pth.tar``, or an exported file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
        return encoder_from_state(sd, path, {}).to(device)
    ck = load_checkpoint(path, trust=trust)
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict (found {type(ck).__name__})")
    if ck.get("format") == "simclr":
        cfg = ck.get("config", {})
        if "model" not in ck:
            raise CheckpointError(f"{path} is a {ck.get('kind', '?')} checkpoint without encoder weights")
        size = ck.get("image_size") or cfg.get("image_size") or _spec_size(cfg)
        return encoder_from_state(ck["model"], path, cfg, size, cfg.get("arch"), cfg.get("width")).to(device)
    if "state_dict" in ck:  # the spec's format
        hp = ck.get("hparams")
        info = vars(hp) if hp is not None and hasattr(hp, "__dict__") else dict(hp or {})
        arch = str(info.get("arch", "")).lower() or None
        if arch == "linear":
            raise CheckpointError(f"{path} is a linear-evaluation head, not an encoder; pass it as --ckpt and "
                                  f"the encoder as --encoder_ckpt")
        return encoder_from_state(ck["state_dict"], path, info, _spec_size(info),
                                  arch if arch in ENCODERS else None).to(device)
    if any(isinstance(v, torch.Tensor) for v in ck.values()):  # a plain state dict (export)
        return encoder_from_state(ck, path, {}).to(device)
    raise CheckpointError(f"{path}: unrecognised checkpoint layout (keys {sorted(map(str, ck))[:8]})")
