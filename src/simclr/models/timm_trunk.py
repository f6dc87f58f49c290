"""Any timm model as the encoder: ``--arch timm:<model name>``.

timm is an optional extra (``pip install 'simclr-torch[timm]'``): this module is the only one that imports it, and
only inside the functions below, when such an arch is asked for. The trunk is
``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)``: its output is the model's pooled
pre-logits feature (``h``), of size ``head_hidden_size`` (``num_features`` for most models). Its parameter
names are timm's own, so an export loads back with ``timm.create_model(..., pretrained=True,
pretrained_cfg_overlay=dict(file=PATH))``. The input side is passed as ``img_size`` to models that take it
(ViTs, Swin ...); the stem is timm's: pick ``patch_size`` or a model suited to small images yourself.
"""
from __future__ import annotations

import difflib
import json

from torch import nn

from ..errors import ConfigError
from ..names import TIMM_PREFIX as PREFIX

INSTALL = "pip install 'simclr-torch[timm]'"


def model_name(arch: str) -> str:
    return arch[len(PREFIX):]


def import_timm(arch: str):
    try:
        import timm
    except ImportError as e:
        raise ConfigError(f"--arch {arch} needs the optional package timm, which is not importable ({e}); install "
                          f"it with: {INSTALL}") from None
    return timm


def check_name(arch: str) -> None:
    """A model timm knows (``resnet18``, ``vit_tiny_patch16_224``, also with a pretrained tag), else the error
    names the closest ones."""
    timm = import_timm(arch)
    name = model_name(arch)
    if name and timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else \
        "; timm.list_models() lists them (e.g. timm:resnet18, timm:vit_tiny_patch16_224)"
    raise ConfigError(f"option 'arch' got {arch!r}: timm has no model {name!r}{hint}")


def create(arch: str, kwargs: dict | None = None, image_size: int | None = None) -> tuple[nn.Module, dict]:
    """(trunk, the keyword arguments it was created with beyond name/pretrained/num_classes). ``img_size`` is
    passed when the model takes it."""
    timm = import_timm(arch)
    name = model_name(arch)
    kw = dict(kwargs or {})
    base = dict(pretrained=False, num_classes=0)
    try:
        model = None
        if image_size:
            try:
                model = timm.create_model(name, **base, img_size=int(image_size), **kw)
                kw["img_size"] = int(image_size)
            except TypeError as e:  # the model has no img_size argument (CNNs): it takes any input size
                if "img_size" not in str(e):
                    raise
        if model is None:
            model = timm.create_model(name, **base, **kw)
    except Exception as e:  # timm raises many types for arguments a model does not accept
        detail = " ".join(str(e).split())[:300]
        raise ConfigError(f"timm could not build {name} with arguments {json.dumps(kw)}: {type(e).__name__}: "
                          f"{detail}; check --timm_kwargs and --image_size") from None
    return model, kw


def feat_dim(model: nn.Module) -> int:
    """Size of the pooled feature a headless timm model returns."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def create_call(arch: str, kwargs: dict, path: str = "PATH") -> str:
    """The line that rebuilds the trunk with timm and loads an export from ``path``."""
    extra = "".join(f", {k}={v!r}" for k, v in sorted(kwargs.items()))
    return (f"m = timm.create_model({model_name(arch)!r}, pretrained=True, pretrained_cfg_overlay=dict(file={path}), "
            f"num_classes=0{extra})")
