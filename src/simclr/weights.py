"""Weights as artifacts: load any encoder checkpoint (ours, the spec's, an export) as a module.

``load_encoder(path)`` -> :class:`Encoder`, an ``nn.Module`` in eval mode mapping images
(N, 3, H, W) with values in [0, 1] (no mean/std normalisation, as in the spec) to the
representation h (N, d).

Accepted files (recognised by content, not by name):
- ours: ``torch.save`` dict with ``format="simclr"``, ``config`` and ``model`` (``convnet.*`` +
  ``projection.*`` keys);
- the spec's ``.pth.tar``: ``{"state_dict": {convnet.*, projection.*}, "hparams": Namespace}``;
- exports (``simclr export``): a bare trunk state dict under torchvision's names (``conv1.weight`` ...) or, for
  a ``timm:`` encoder, timm's (the model card or the safetensors metadata names the model), as a ``torch.save``
  file or as safetensors (optionally with ``projection.*`` keys).

Files are opened by :func:`simclr.checkpoint.read` (card checksum, zip size checks, no pickled code
unless the caller passes ``trust=True``); this module turns what it returns into a model. Every load is strict:
a missing or misshapen tensor is an error naming the file, never a partial load.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .checkpoint import read, read_card, resolve, unwrap_state_dict
from .errors import CheckpointError, UserError
from .models import ENCODERS, ProjectionHead, SimCLRModel, init_weights, is_named, split_arch
from .names import parse_kwargs

__all__ = ["Encoder", "load_encoder", "load_linear_head", "encoder_from_state"]

_SUPPORTED = ", ".join(ENCODERS)


class Encoder(nn.Module):
    """A loaded encoder: ``forward(x) -> h``; ``encode(x, layer)`` for head layers when present.

    x: (N, 3, H, W) float in [0, 1]; h: (N, feat_dim). Attributes: ``arch`` (``resnet50``,
    ``timm:vit_tiny_patch16_224``), ``name`` (``resnet50x2`` for a wide one), ``width`` (0 for timm), ``timm_kwargs``,
    ``feat_dim``, ``input_size`` (the side it was trained on), ``cifar_stem``, ``model`` (the full
    :class:`SimCLRModel`, head included), ``has_head``, ``source`` (path), ``info`` (config/hparams
    dict of the checkpoint) and ``card`` (what is known of its training: data, step, metrics ...).
    """

    def __init__(self, model: SimCLRModel, input_size: int, source: str = "", info: Optional[dict] = None,
                 has_head: bool = True, card: Optional[dict] = None):
        super().__init__()
        self.model = model
        self.arch, self.name, self.width = model.arch, model.name, model.width
        self.cifar_stem, self.timm_kwargs = model.cifar_stem, model.timm_kwargs
        self.feat_dim = model.feat_dim
        self.input_size = input_size
        self.source = source
        self.info = info or {}
        self.card = card or {}
        self.has_head = has_head
        self.warn_size = True  # once, on the first input of another side than input_size
        self.eval()

    @property
    def transform(self):
        """PIL image (any size) -> (3, input_size, input_size) in [0, 1]: the evaluation's preprocessing."""
        from .data.transforms import InputTransform
        return InputTransform(self.input_size)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Encoder expects a batch of RGB images (N, 3, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"Encoder expects float images with values in [0, 1], got dtype {x.dtype}")
        if self.warn_size and self.input_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            self.warn_size = False
            import warnings
            warnings.warn(f"this encoder was trained on {self.input_size}x{self.input_size} images but got "
                          f"{x.shape[-2]}x{x.shape[-1]}; its features may be poor. Preprocess with encoder.transform "
                          f"(resize and centre-crop to {self.input_size} px)", UserWarning, stacklevel=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.model.convnet(x)

    def encode(self, x: torch.Tensor, layer: str = "h") -> torch.Tensor:
        if layer != "h" and not self.has_head:
            raise CheckpointError(f"{self.source} holds no projection head; encode_layer must be h")
        self._check(x)
        return self.model.encode(x, layer)

    def extra_repr(self) -> str:
        shape = f"timm_kwargs={self.timm_kwargs}" if is_named(self.arch) else \
            f"width={self.width}, cifar_stem={self.cifar_stem}"
        return (f"arch={self.name}, {shape}, feat_dim={self.feat_dim}, input_size={self.input_size}, "
                f"source={self.source!r}")


# ---------------------------------------------------------------------------------------------
# state dict level
# ---------------------------------------------------------------------------------------------

def _short(keys: list, n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def _strict_load(model: nn.Module, sd: dict, path) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(list(missing))}")
        if unexpected:
            parts.append(f"unexpected keys {_short(list(unexpected))}")
        raise CheckpointError(f"{path}: state dict does not match a {model.name} encoder "
                              f"({'; '.join(parts)}); refusing a partial load")


def _check_shapes(model: nn.Module, sd: dict, path) -> None:
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            what = model.name if is_named(model.arch) else f"{model.arch} of width {model.width}"
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)} but a {what} expects {tuple(own[k].shape)} "
                                  f"(a checkpoint of another architecture?)")


def _infer_arch(sd: dict, path) -> tuple[str, int]:
    """(arch, width) from the trunk's keys: block type and blocks per stage must match a known ResNet."""
    blocks = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"convnet.layer{i}.")}) for i in range(1, 5))
    bottleneck = "convnet.layer1.0.conv3.weight" in sd
    kind = "bottleneck" if bottleneck else "basic"
    for name, (block, layers) in ENCODERS.items():
        if (block.expansion == 4) == bottleneck and tuple(layers) == blocks:
            return name, int(sd["convnet.conv1.weight"].shape[0])
    raise CheckpointError(f"{path}: unsupported architecture, a ResNet with {kind} blocks {list(blocks)} per stage; "
                          f"supported: {_SUPPORTED}")


def _looks_linear(sd: dict) -> bool:
    """A linear classifier: a 2-d weight and a bias, nothing convolutional."""
    keys = [k for k in sd if isinstance(sd[k], torch.Tensor)]
    return (0 < len(keys) <= 4 and all(k.split(".")[-1] in ("weight", "bias") for k in keys)
            and any(sd[k].dim() == 2 for k in keys) and not any(sd[k].dim() == 4 for k in keys))


def _linear_error(path) -> CheckpointError:
    return CheckpointError(f"{path} is a linear-evaluation head (weight + bias), not an encoder; pass it as --ckpt "
                           f"and the encoder as --encoder_ckpt")


def _head_layout(sd: dict, path) -> tuple[bool, int, int]:
    """(has a projection head, its layers, its output size) from ``projection.*`` keys."""
    has_head = any(k.startswith("projection.") for k in sd)
    proj_layers = len({k.split(".")[1] for k in sd if k.startswith("projection.fc")}) if has_head else 2
    if has_head and (proj_layers not in (2, 3) or f"projection.fc{proj_layers}.weight" not in sd):
        raise CheckpointError(f"{path}: projection head keys are incomplete or unknown "
                              f"({_short(sorted(k for k in sd if k.startswith('projection.')))})")
    return has_head, proj_layers, sd[f"projection.fc{proj_layers}.weight"].shape[0] if has_head else 128


def _load_into(model: SimCLRModel, sd: dict, has_head: bool, path) -> None:
    """Strict load; a trunk-only file gets a freshly initialised head (keeps encode(x, 'g1') usable)."""
    if not has_head:
        head = ProjectionHead(model.feat_dim, _proj_dim(model), model.projection.layers)
        init_weights(head)
        sd = dict(sd, **{f"projection.{k}": v for k, v in head.state_dict().items()})
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # fp16/bf16 exports
    _check_shapes(model, sd, path)
    _strict_load(model, sd, path)


def _proj_dim(model: SimCLRModel) -> int:
    return getattr(model.projection, f"fc{model.projection.layers}").out_features


def encoder_from_state(sd: dict, path, info: Optional[dict] = None, input_size: Optional[int] = None,
                       arch: Optional[str] = None, width: Optional[int] = None, card: Optional[dict] = None,
                       timm_kwargs=None) -> Encoder:
    """Build an Encoder from a state dict with ``convnet.*`` (+ optional ``projection.*``) keys, or a bare
    torchvision-named trunk. ``arch``/``width``, when given (from the checkpoint's config), must agree with
    the weights. A ``timm:`` arch (its ``timm_kwargs`` a dict or JSON text) is rebuilt with timm and loaded."""
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{path}: no state dict found (got {type(sd).__name__})")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {_short(list(map(str, bad)))}")
    nonfinite = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:  # a diverged run's weights give NaN features and chance accuracy: refuse them here
        raise CheckpointError(f"{path}: non-finite weights (NaN or inf) in {_short(list(map(str, nonfinite)))}; "
                              f"the run diverged before this checkpoint — use an earlier one")
    sd = unwrap_state_dict(sd)
    if isinstance(arch, str) and arch and not is_named(arch) and split_arch(arch.lower())[0] not in ENCODERS:
        raise CheckpointError(f"{path}: its encoder is the backbone {arch!r}, which this process does not know: "
                              f"register it first (simclr.models.register_backbone, as the script that trained it "
                              f"did), then load the checkpoint")
    if is_named(arch):
        return _named_encoder(sd, path, info, input_size, arch, timm_kwargs, card)
    if not any(k.startswith("convnet.") for k in sd):
        if "conv1.weight" in sd:  # a bare torchvision-style trunk (our export, or a torchvision model)
            sd = {k if k.startswith("projection.") else f"convnet.{k}": v for k, v in sd.items()}
        elif _looks_linear(sd):
            raise _linear_error(path)
        else:
            raise CheckpointError(f"{path}: no ResNet encoder weights found (expected keys like convnet.conv1.weight "
                                  f"or conv1.weight; found {_short(sorted(sd))}); a timm encoder's export needs its "
                                  f"model card <file>.json beside it, which names the model")
    # the spec's trunk carries an unused 1000-way fc; other top-level modules (a classifier saved beside the
    # encoder) are not part of the encoder either
    sd = {k: v for k, v in sd.items() if k.startswith(("convnet.", "projection.")) and not k.startswith("convnet.fc.")}
    if "convnet.conv1.weight" not in sd or sd["convnet.conv1.weight"].dim() != 4:
        raise CheckpointError(f"{path}: missing keys convnet.conv1.weight (the first convolution); refusing a "
                              f"partial load")
    g_arch, g_width = _infer_arch(sd, path)
    if arch is not None:
        arch = split_arch(str(arch).lower())[0]
        if arch in ENCODERS and arch != g_arch:
            raise CheckpointError(f"{path}: wrong architecture: its config says {arch} but the weights are a {g_arch}")
    if width and int(width) != g_width:
        raise CheckpointError(f"{path}: its config says width {width} but the weights have width {g_width}")
    k1 = sd["convnet.conv1.weight"].shape[-1]
    if k1 not in (3, 7):
        raise CheckpointError(f"{path}: first convolution is {k1}x{k1}; expected 3x3 (CIFAR stem) or 7x7 "
                              f"(ImageNet stem)")
    cifar_stem = k1 == 3
    has_head, proj_layers, proj_dim = _head_layout(sd, path)
    # Built on the meta device and then given the loaded tensors (assign=True): initialising a ResNet-50
    # only to overwrite it costs tens of seconds on a CPU. Every tensor must come from the file.
    with torch.device("meta"):
        model = SimCLRModel(g_arch, cifar_stem=cifar_stem, width=g_width, proj_layers=proj_layers, proj_dim=proj_dim)
    _load_into(model, sd, has_head, path)
    size = int(input_size or (32 if cifar_stem else 224))
    return Encoder(model, size, str(path), info, has_head, card)


def _named_encoder(sd: dict, path, info, input_size, arch: str, timm_kwargs, card) -> Encoder:
    """A ``timm:`` encoder or one of :data:`simclr.names.BACKBONES`: ``convnet.*`` keys (our checkpoints) or the
    trunk's own names (exports)."""
    if not any(k.startswith("convnet.") for k in sd):
        if _looks_linear(sd):
            raise _linear_error(path)
        sd = {k if k.startswith("projection.") else f"convnet.{k}": v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k.startswith(("convnet.", "projection."))}
    try:  # an export's card records what the trunk was created with, img_size included
        kwargs = dict(json.loads(timm_kwargs) if isinstance(timm_kwargs, str) and timm_kwargs else timm_kwargs or {})
        size = kwargs.pop("img_size", None) or input_size
        kwargs = parse_kwargs(kwargs)
    except (UserError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its recorded timm_kwargs {str(timm_kwargs)[:80]!r} are unusable: {e}") from None
    has_head, proj_layers, proj_dim = _head_layout(sd, path)
    # built on the CPU, not the meta device: timm models may hold buffers that no state dict carries
    model = SimCLRModel(arch, proj_layers=proj_layers, proj_dim=proj_dim, timm_kwargs=kwargs, image_size=size)
    _load_into(model, sd, has_head, path)
    return Encoder(model, int(size or 224), str(path), info, has_head, card)


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------

def _spec_size(hp: dict) -> int:
    data = str(hp.get("data", "cifar")).lower()
    return 32 if data.startswith("cifar") else (96 if data.startswith("stl") else 224)


def load_encoder(path, trust: bool = False, device="cpu", *, arch: Optional[str] = None,
                 frozen: bool = True) -> Encoder:
    """Load an encoder from our checkpoint, the spec's ``.pth.tar``, or an exported file.

    ``trust=True`` (the user's ``--trust_checkpoint true``) allows full unpickling, with a warning;
    ``arch`` (optional) is the architecture the caller expects: another one is an error. ``frozen`` (default):
    a feature extractor, its parameters with ``requires_grad=False``, so its features carry no graph; pass
    ``frozen=False`` to fine-tune it.
    """
    enc = _load_encoder(path, trust, device, arch)
    if frozen:
        enc.requires_grad_(False)
    return enc


def _load_encoder(path, trust: bool, device, arch: Optional[str]) -> Encoder:
    path = resolve(path)  # a run folder: its newest valid checkpoint; a model card: the file it describes
    ck = read(path, trust=trust)
    card = read_card(path)
    if ck.get("format") == "safetensors":
        sd, meta = ck["state_dict"], ck["metadata"]
        size = meta.get("input_size") or card.get("input_size")
        enc = encoder_from_state(sd, path, dict(meta), size and int(size), arch or meta.get("arch"), card=card,
                                 timm_kwargs=meta.get("timm_kwargs") or card.get("timm_kwargs"))
        return enc.to(device)
    if ck.get("format") == "simclr":
        cfg = ck.get("config") or {}
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{path}: its 'config' is a {type(cfg).__name__}, not a mapping; the file was not "
                                  f"written by this project or was edited")
        if "model" not in ck or not any(str(k).split(".")[0] in ("convnet", "module", "_orig_mod")
                                        for k in (ck.get("model") or {})):
            if _looks_linear(ck.get("model") or ck.get("head") or {}) or ck.get("kind") == "linear":
                raise _linear_error(path)
            raise CheckpointError(f"{path} is a {ck.get('kind', '?')} checkpoint without encoder weights")
        size = ck.get("image_size") or cfg.get("image_size") or _spec_size(cfg)
        if not isinstance(size, int) or not 8 <= size <= 4096:
            raise CheckpointError(f"{path}: its image_size {str(size)[:40]!r} is not a side in pixels (8-4096)")
        meta = {k: ck.get(k) for k in ("kind", "step", "metrics") if ck.get(k) is not None}
        meta.update({k: cfg[k] for k in ("data", "iters", "batch_size", "temperature") if k in cfg})
        meta.update({k: card[k] for k in ("epochs", "sha256") if k in card})
        _expect(path, arch, cfg.get("arch"))
        enc = encoder_from_state(ck["model"], path, cfg, size, arch or cfg.get("arch"), cfg.get("width"), meta,
                                 timm_kwargs=cfg.get("timm_kwargs"))
        return enc.to(device)
    if "state_dict" in ck:  # the spec's format
        hp = ck.get("hparams")
        info = dict(vars(hp)) if hp is not None and hasattr(hp, "__dict__") else dict(hp or {})
        hp_arch = str(info.get("arch", "")).lower() or None
        sd = ck["state_dict"]
        if hp_arch == "linear" or (isinstance(sd, dict) and _looks_linear(sd)):
            raise _linear_error(path)
        _expect(path, arch, hp_arch if hp_arch in ENCODERS else None)
        meta = {"data": info.get("data"), "step": ck.get("iter"), "format": "spec"}
        meta.update({k: info[k] for k in ("iters", "batch_size", "temperature") if k in info})
        return encoder_from_state(sd, path, info, _spec_size(info), arch or hp_arch,
                                  card={k: v for k, v in meta.items() if v is not None}).to(device)
    if any(isinstance(v, torch.Tensor) for v in ck.values()):  # a plain state dict (export)
        return encoder_from_state(ck, path, {}, card.get("input_size"), arch or card.get("arch"),
                                  card=card, timm_kwargs=card.get("timm_kwargs")).to(device)
    raise CheckpointError(f"{path}: unrecognised checkpoint layout (keys {_short(sorted(map(str, ck)), 8)}); "
                          f"expected our checkpoint, the spec's .pth.tar or an exported state dict")


def _expect(path, want: Optional[str], have: Optional[str]) -> None:
    if want and have and str(want).lower() != str(have).lower():
        raise CheckpointError(f"{path}: wrong architecture: expected {str(want).lower()}, the checkpoint is a "
                              f"{str(have).lower()}")


def load_linear_head(path, trust: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(weight (classes, d), bias (classes,), info) of a linear-evaluation checkpoint: the spec's
    ``{"state_dict": {"weight", "bias"}, "hparams"}`` or a plain ``{"weight", "bias"}`` dict."""
    path = Path(path)
    ck = read(path, trust=trust)
    if ck.get("format") == "safetensors":
        ck, info = ck["state_dict"], dict(ck["metadata"])
    else:
        hp = ck.get("hparams")
        info = dict(vars(hp)) if hp is not None and hasattr(hp, "__dict__") else dict(hp or {})
        ck = ck.get("state_dict", ck.get("model", ck))
    sd = unwrap_state_dict(ck) if isinstance(ck, dict) else {}
    w = next((v for k, v in sd.items() if k.split(".")[-1] == "weight" and isinstance(v, torch.Tensor)), None)
    b = next((v for k, v in sd.items() if k.split(".")[-1] == "bias" and isinstance(v, torch.Tensor)), None)
    if not _looks_linear(sd) or w is None or b is None or w.dim() != 2 or b.shape != w.shape[:1]:
        what = "an encoder" if any("conv1" in k for k in sd) else f"keys {_short(sorted(map(str, sd)))}"
        raise CheckpointError(f"{path} is not a linear-evaluation head (expected weight (classes, d) and bias "
                              f"(classes,); found {what})")
    return w, b, info
