"""The names and spellings the options accept, written without torch: encoder and dataset names, the width
arithmetic of a ResNet name, the ``timm:`` prefix and its ``--timm_kwargs``, the blur sigma range.

:mod:`simclr.options` checks a config with these alone, so ``--help`` and every config error finish without
importing torch. The modules that build things take them from here: :mod:`simclr.models.resnet` (its
``ENCODERS`` registry must list exactly :data:`RESNETS`), :mod:`simclr.models.timm_trunk` and
:mod:`simclr.data` (its datasets must be exactly :data:`DATASETS`); a test keeps the tables in step.
"""
from __future__ import annotations

import json
import math
import re

from .errors import ConfigError

# The built-in ResNet encoders (simclr.models.resnet.ENCODERS builds them); resnet200 is the official SimCLR code's.
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200")
# The datasets simclr.data.get_dataset reads; ``folder`` is any image folder (--data_path).
DATASETS = ("cifar10", "cifar100", "stl10", "imagenet", "folder")
DATA_ALIASES = {"cifar": "cifar10"}  # accepted spellings of dataset names, mapped to ours

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


TIMM_PREFIX = "timm:"
# create_model arguments the encoder sets itself, and where the user sets them instead
TIMM_RESERVED = {"pretrained": "SimCLR pretrains from random initialisation",
                 "num_classes": "the trunk is built headless (num_classes=0): h is its pooled feature",
                 "img_size": "the input side is --image_size",
                 "pretrained_cfg": "no pretrained weights are loaded", "pretrained_cfg_overlay": "no pretrained "
                 "weights are loaded", "checkpoint_path": "no pretrained weights are loaded; resume with --resume / "
                 "--ckpt"}
MAX_KWARGS_CHARS = 2000


def is_timm(arch) -> bool:
    return isinstance(arch, str) and arch.startswith(TIMM_PREFIX)


# Encoders beside the ResNets and timm: name -> "module:callable" (imported when first built, so that the options stay
# torch-free) or the callable itself (simclr.models.register_backbone, from a script). ``callable(image_size,
# **kwargs)`` returns an nn.Module mapping images (N, 3, S, S) to features (N, feat_dim), with an int attribute
# ``feat_dim``; ``--timm_kwargs`` passes it keyword arguments. A backbone in the package is its module and one line
# here (docs/extending.md, "A backbone").
BACKBONES: dict = {}


def is_named(arch) -> bool:
    """Whether ``arch`` is a trunk built by its name alone (a timm model or one of :data:`BACKBONES`): none of the
    ResNets' width arithmetic, CIFAR stem or zero-init; its own initialisation; its arguments in ``--timm_kwargs``."""
    return is_timm(arch) or (isinstance(arch, str) and arch in BACKBONES)


def _scalar_or_list(v) -> bool:
    scalar = (str, int, float, bool, type(None))
    return isinstance(v, scalar) or (isinstance(v, list) and len(v) <= 64 and all(isinstance(x, scalar) for x in v))


def parse_kwargs(value) -> dict:
    """``--timm_kwargs``: a JSON object (or, from YAML, a mapping) of extra ``create_model`` arguments, e.g.
    ``{"patch_size": 4}``; '' is none. Values are numbers, strings, booleans, null or flat lists."""
    if value in ("", None):
        return {}
    if isinstance(value, str):
        if len(value) > MAX_KWARGS_CHARS:
            raise ConfigError(f"option 'timm_kwargs' is {len(value)} characters long; a few create_model arguments "
                              f"are expected")
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ConfigError(f"option 'timm_kwargs' is not valid JSON ({e}); write a JSON object with double quotes, "
                              f"e.g. --timm_kwargs '{{\"patch_size\": 4}}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"option 'timm_kwargs' must be a JSON object of create_model arguments, e.g. "
                          f"'{{\"patch_size\": 4}}', got a {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(k, str) or not k.isidentifier():
            raise ConfigError(f"option 'timm_kwargs': {str(k)[:40]!r} is not an argument name")
        if k in TIMM_RESERVED:
            raise ConfigError(f"option 'timm_kwargs' may not set {k!r}: {TIMM_RESERVED[k]}")
        if not _scalar_or_list(v):
            raise ConfigError(f"option 'timm_kwargs': {k!r} must be a number, string, boolean, null or a flat list")
    return value


def canonical_kwargs(value) -> str:
    """The one spelling recorded in configs (sorted keys, no spaces), so equal arguments compare equal."""
    kw = parse_kwargs(value)
    return json.dumps(kw, sort_keys=True, separators=(",", ":")) if kw else ""


def blur_sigma_range(v) -> tuple[float, float]:
    """'0.1,2.0' (also '0.1 2.0', '(0.1, 2.0)' or a pair) -> (0.1, 2.0)."""
    if isinstance(v, (tuple, list)):
        parts = list(v)
    else:
        parts = [p for p in str(v).strip("()[] ").replace(",", " ").split() if p]
    if len(parts) != 2:
        raise ValueError(f"expected two numbers 'lo,hi', got {v!r}")
    lo, hi = float(parts[0]), float(parts[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"expected two finite numbers 'lo,hi', got {v!r}")
    return lo, hi
