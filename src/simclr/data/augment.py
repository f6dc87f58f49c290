"""The SimCLR augmentation, declared once per op; both backends are built from that one declaration.

An op (a subclass of :class:`Op`) says in one place:

* what it takes from the config (its constructor's arguments, filled by :meth:`AugSpec.ops`);
* how it draws its random numbers: ``uniforms`` U[0, 1) numbers per view, turned into named per-view
  parameters by ``draw`` (the batched backend draws all ops' numbers of a batch in one call, so the views
  are a function of the generator's seed alone);
* how it applies to one image: ``reference()``, a torchvision transform (PIL, or a tensor when ``on_tensor``),
  which draws from torch's global generator as torchvision does: the spec's pipeline, in DataLoader workers;
* how it applies to a batch on the device: ``batch(x, params)``, float (N, 3, S, S) in [0, 1].

:class:`AugSpec` is the recipe resolved from a config (image size, crop scale, colour strength, blur, sigma
range, resampling). Everything that augments is built from it: the reference loader's transform
(:meth:`AugSpec.reference`), the fast path's :class:`BatchAugment`, the report's "views the network is trained
on", and the linear evaluation's train-time augmentation (:func:`linear_eval_ops`).

A new op is one class here plus its place in :meth:`AugSpec.ops` (and its option, if it has one);
tests/data/test_augment_backends.py then checks each op's batched backend against its reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..errors import DataError
from ..names import blur_sigma_range
from . import batch_aug as kernels
from .transforms import OFFICIAL_BLUR_SIGMA, Clip, blur_kernel_size, use_blur

INTERPOLATIONS = kernels.INTERPOLATIONS
RATIO = (3 / 4, 4 / 3)
TRIALS = 10  # torchvision's RandomResizedCrop tries 10 times before falling back to a centre crop


class AugParams(SimpleNamespace):
    """Random parameters of N views, one attribute per name an op's ``draw`` returns (the SimCLR recipe's: boxes
    (N, 4) crop x1, y1, x2, y2 in pixel-edge coordinates of the source image; flip; jitter, order (N, 4) op index
    at each jitter position: 0 brightness, 1 contrast, 2 saturation, 3 hue; factors (N, 4) in that numbering;
    gray; blur, sigma)."""


class Op:
    """One augmentation step with both backends (see the module docstring)."""

    uniforms = 0        # U[0, 1) numbers per view the batched backend draws for this op
    on_tensor = False   # the reference applies it to a tensor (after ToTensor), not to a PIL image

    def draw(self, u: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor) -> dict:
        """u: (N, uniforms) -> named per-view parameters."""
        return {}

    def batch(self, x: torch.Tensor, p: AugParams) -> torch.Tensor:
        return x

    def reference(self):
        """The torchvision transform for one image, or None when the op is off."""
        return None


class ResizedCrop(Op):
    """RandomResizedCrop (scale [scale_lower, 1], ratio [3/4, 4/3], bicubic): torchvision's ``get_params``
    exactly (10 trials, rounding, the centre-crop fallback), vectorised. The batched backend resamples with
    ``interpolation`` (see :func:`simclr.data.batch_aug.resized_crops`)."""

    uniforms = 2 * TRIALS + 2  # area and ratio per trial, then top and left

    def __init__(self, size: int, scale_lower: float = 0.08, interpolation: str = "auto"):
        if interpolation not in INTERPOLATIONS:
            raise DataError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.size, self.scale_lower, self.interpolation = size, scale_lower, interpolation

    def draw(self, u, heights, widths):
        hh, ww = heights.float().unsqueeze(1), widths.float().unsqueeze(1)
        area = hh * ww * (self.scale_lower + (1 - self.scale_lower) * u[:, :TRIALS])
        lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
        aspect = torch.exp(lo + (hi - lo) * u[:, TRIALS:2 * TRIALS])
        cw = torch.round(torch.sqrt(area * aspect))
        ch = torch.round(torch.sqrt(area / aspect))
        ok = (cw > 0) & (cw <= ww) & (ch > 0) & (ch <= hh)
        first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first successful trial
        found = ok.any(dim=1)
        cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
        hh, ww = hh.squeeze(1), ww.squeeze(1)
        # fallback: the whole image, or its centre cut to the nearest allowed ratio
        in_ratio = ww / hh
        fw = torch.where(in_ratio > RATIO[1], torch.round(hh * RATIO[1]), ww)
        fh = torch.where(in_ratio < RATIO[0], torch.round(ww / RATIO[0]), hh)
        cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
        top = torch.minimum(torch.floor(u[:, 2 * TRIALS] * (hh - ch + 1)), hh - ch)
        left = torch.minimum(torch.floor(u[:, 2 * TRIALS + 1] * (ww - cw + 1)), ww - cw)
        top = torch.where(found, top, torch.div(hh - ch, 2, rounding_mode="floor"))
        left = torch.where(found, left, torch.div(ww - cw, 2, rounding_mode="floor"))
        return {"boxes": torch.stack([left, top, left + cw, top + ch], dim=1)}

    def resample(self, src: torch.Tensor, p: AugParams, src_index: torch.Tensor,
                 rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The views' crops of ``src`` (view k from image ``src_index[k]``; ``rows``: which views' boxes)."""
        boxes = p.boxes if rows is None else p.boxes[rows]
        return kernels.resized_crops(src, boxes, src_index, self.size, self.interpolation)

    def reference(self):
        return T.RandomResizedCrop(self.size, scale=(self.scale_lower, 1.0), ratio=RATIO,
                                   interpolation=InterpolationMode.BICUBIC)


class Flip(Op):
    """Horizontal flip with probability 0.5."""

    uniforms = 1

    def draw(self, u, heights, widths):
        return {"flip": u[:, 0] < 0.5}

    def batch(self, x, p):
        return kernels.per_view(p.flip, x.flip(-1), x)

    def reference(self):
        return T.RandomHorizontalFlip(p=0.5)


class ColorJitter(Op):
    """With probability 0.8: brightness, contrast, saturation (0.8 s each) and hue (0.2 s) in a random order per
    image, torchvision's formulas (the paper's colour distortion of strength s)."""

    uniforms = 1 + 4 + 4  # apply, the order's 4 keys, the 4 factors

    def __init__(self, s: float = 1.0):
        self.s = float(s)
        v, h = 0.8 * self.s, min(0.2 * self.s, 0.5)
        self.ranges = torch.tensor([[max(0.0, 1 - v), 1 + v]] * 3 + [[-h, h]], dtype=torch.float32)
        self._on: dict = {}  # the ranges per device, copied there once (not at every step)

    def draw(self, u, heights, widths):
        key = str(u.device)
        if key not in self._on:  # a host-to-device copy: once, not at every step
            self._on[key] = self.ranges.to(u.device)
        rng = self._on[key]
        return {"jitter": (u[:, 0] < 0.8) & (self.s > 0),
                "order": torch.argsort(u[:, 1:5], dim=1),  # a uniformly random permutation of the 4 ops
                "factors": rng[:, 0] + (rng[:, 1] - rng[:, 0]) * u[:, 5:9]}

    def batch(self, x, p):
        return kernels.color_jitter(x, p.order, p.factors, p.jitter)

    def reference(self):
        v = 0.8 * self.s
        return T.RandomApply([T.ColorJitter(brightness=v, contrast=v, saturation=v, hue=min(0.2 * self.s, 0.5))],
                             p=0.8)


class Grayscale(Op):
    """Grayscale (ITU-R 601 luma, three equal channels) with probability 0.2."""

    uniforms = 1

    def draw(self, u, heights, widths):
        return {"gray": u[:, 0] < 0.2}

    def batch(self, x, p):
        return kernels.per_view(p.gray, kernels.grayscale(x).expand_as(x), x)

    def reference(self):
        return T.RandomGrayscale(p=0.2)


class Blur(Op):
    """Gaussian blur with probability 0.5, sigma U[lo, hi], kernel 10% of the side (odd), reflect padding. Off,
    it still draws its numbers (the other ops' random numbers stay where they are)."""

    uniforms = 2
    on_tensor = True

    def __init__(self, size: int, enabled: bool, sigma=OFFICIAL_BLUR_SIGMA):
        self.enabled, self.sigma = bool(enabled), blur_sigma_range(sigma)
        self.kernel = blur_kernel_size(size) if self.enabled else 0

    def draw(self, u, heights, widths):
        lo, hi = self.sigma
        return {"blur": (u[:, 0] < 0.5) & self.enabled, "sigma": lo + (hi - lo) * u[:, 1]}

    def batch(self, x, p):
        return kernels.gaussian_blur(x, p.sigma, self.kernel, p.blur) if self.enabled else x

    def reference(self):
        return T.RandomApply([T.GaussianBlur(self.kernel, sigma=self.sigma)], p=0.5) if self.enabled else None


class PadCrop(Op):
    """Pad by ``pad`` pixels (reflect) and crop back to the side at a uniformly random offset: the spec's CIFAR
    linear-evaluation augmentation (torchvision's RandomCrop(S, padding, padding_mode='reflect'))."""

    uniforms = 2

    def __init__(self, size: int):
        self.size, self.pad = size, max(1, size // 8)

    def draw(self, u, heights, widths):
        span = 2 * self.pad + 1
        return {"top": (u[:, 0] * span).long().clamp_(max=span - 1),
                "left": (u[:, 1] * span).long().clamp_(max=span - 1)}

    def batch(self, x, p):
        n, _, h, w = x.shape
        xp = torch.nn.functional.pad(x, (self.pad,) * 4, mode="reflect")
        rows = (p.top.unsqueeze(1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (p.left.unsqueeze(1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        return xp[torch.arange(n, device=x.device).view(n, 1, 1, 1), torch.arange(x.shape[1], device=x.device)
                  .view(1, -1, 1, 1), rows, cols]

    def reference(self):
        return T.RandomCrop(self.size, padding=self.pad, padding_mode="reflect")


def reference_transform(ops: list, before: Optional[list] = None) -> T.Compose:
    """One image -> float tensor (3, S, S) in [0, 1]: ``before`` (deterministic PIL steps), the ops' reference
    transforms in order, ToTensor before the first op that works on tensors, then a clamp to [0, 1]."""
    steps, tensor = list(before or []), False
    for op in ops:
        if op.on_tensor and not tensor:
            steps.append(T.ToTensor())
            tensor = True
        t = op.reference()
        if t is not None:
            steps.append(t)
    if not tensor:
        steps.append(T.ToTensor())
    return T.Compose(steps + [Clip()])


@dataclass(frozen=True)
class AugSpec:
    """The SimCLR view recipe, resolved from a config once."""

    size: int
    scale_lower: float = 0.08
    color_dist_s: float = 1.0
    blur: str = "auto"
    blur_sigma: tuple = OFFICIAL_BLUR_SIGMA
    interpolation: str = "auto"

    @classmethod
    def from_config(cls, cfg, size: int, interpolation: str = "auto") -> "AugSpec":
        """From a config object or a config.yaml dict; options it lacks take the spec's defaults."""
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d: getattr(cfg, k, d))
        return cls(int(size), float(get("scale_lower", 0.08)), float(get("color_dist_s", 1.0)),
                   str(get("blur", "auto")), blur_sigma_range(get("blur_sigma", OFFICIAL_BLUR_SIGMA)), interpolation)

    def ops(self) -> list:
        """The ops in the order they apply; the first makes the views (a crop of each source image)."""
        return [ResizedCrop(self.size, self.scale_lower, self.interpolation), Flip(),
                ColorJitter(self.color_dist_s), Grayscale(),
                Blur(self.size, use_blur(self.size, self.blur), self.blur_sigma)]

    def describe(self) -> str:
        """One phrase for captions: '32px random resized crop (scale 0.08-1), flip, ... blur off (blur=auto)'."""
        on = use_blur(self.size, self.blur)
        sigma = f", sigma {self.blur_sigma[0]:g}-{self.blur_sigma[1]:g}" if on else ""
        return (f"{self.size}px random resized crop (scale {self.scale_lower:g}-1), flip, colour distortion "
                f"s={self.color_dist_s:g}, grayscale p=0.2, blur {'on' if on else 'off'} (blur={self.blur}{sigma})")

    def reference(self) -> T.Compose:
        """PIL image -> one augmented view, (3, S, S) float in [0, 1] (the spec's pipeline)."""
        return reference_transform(self.ops())


def simclr_transform(image_size: int, color_dist_s: float = 1.0, scale_lower: float = 0.08, blur: str = "auto",
                     blur_sigma=OFFICIAL_BLUR_SIGMA) -> T.Compose:
    """PIL image -> one augmented view, (3, S, S) float in [0, 1]: the reference backend of :class:`AugSpec`."""
    return AugSpec(image_size, scale_lower, color_dist_s, blur, blur_sigma_range(blur_sigma)).reference()


def linear_eval_ops(kind: str, image_size: int, scale_lower: float = 0.08) -> list:
    """The linear evaluation's train-time augmentation: RandomCrop (pad and crop back, then flip: CIFAR) or
    RandomResizedCrop (then flip: ImageNet)."""
    if kind == "RandomResizedCrop":
        return [ResizedCrop(image_size, scale_lower), Flip()]
    if kind == "RandomCrop":
        return [PadCrop(image_size), Flip()]
    raise ValueError(f"augmentation must be RandomCrop, RandomResizedCrop or none, got {kind!r}")


def draw(ops: list, heights: torch.Tensor, widths: torch.Tensor, generator: torch.Generator) -> AugParams:
    """All ops' parameters of N views (heights/widths: (N,) float source sizes, on the device), from one call
    to the generator: the ops' uniforms side by side, in op order."""
    n = heights.shape[0]
    u = torch.rand(n, sum(op.uniforms for op in ops), generator=generator, device=heights.device)
    params, at = {}, 0
    for op in ops:
        params.update(op.draw(u[:, at:at + op.uniforms], heights, widths))
        at += op.uniforms
    return AugParams(**params)


def sample_params(heights: torch.Tensor, widths: torch.Tensor, generator: torch.Generator,
                  scale_lower: float = 0.08, color_dist_s: float = 1.0, blur: bool = False,
                  blur_sigma=OFFICIAL_BLUR_SIGMA) -> AugParams:
    """The SimCLR recipe's parameters of N views (its ops' ``draw``; the crop size does not enter them)."""
    spec = AugSpec(1, scale_lower, color_dist_s, "on" if blur else "off", blur_sigma_range(blur_sigma))
    return draw(spec.ops(), heights, widths, generator)


def apply(ops: list, x: torch.Tensor, p: AugParams) -> torch.Tensor:
    """The ops after the one that made the views, on a batch of views, then the clamp to [0, 1]."""
    for op in ops:
        x = op.batch(x, p)
    return x.clamp_(0, 1)


class BatchAugment:
    """The SimCLR view generator for a batch: m independent views of each of B images, the ops of ``spec``."""

    def __init__(self, spec: AugSpec, multiplier: int = 2):
        self.spec, self.m, self.size = spec, multiplier, spec.size
        self.ops = spec.ops()
        self.crop, self.rest = self.ops[0], self.ops[1:]
        # the blur's kernel side (0: no blur), wherever the blur sits in the recipe (ops may be appended after it)
        self.blur_kernel = next((op.kernel for op in self.ops if isinstance(op, Blur)), 0)

    def params(self, heights: torch.Tensor, widths: torch.Tensor, generator: torch.Generator) -> AugParams:
        return draw(self.ops, heights, widths, generator)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x: (B, 3, H, W) float in [0, 1] -> (m*B, 3, S, S) ordered [view 1 of all; view 2; ...]."""
        b, _, h, w = x.shape
        n = self.m * b
        p = self.params(torch.full((n,), float(h), device=x.device), torch.full((n,), float(w), device=x.device),
                        generator)
        src = torch.arange(b, device=x.device).repeat(self.m)
        return apply(self.rest, self.crop.resample(x, p, src), p)

    def from_list(self, images: list, generator: torch.Generator) -> torch.Tensor:
        """Images of different sizes (a list of (3, H_k, W_k), uint8 or float in [0, 1]) -> (m*B, 3, S, S).

        Images of the same size are cropped together, one resampling call per distinct size (all m views
        of all its images at once): the same crops as one call per image, without the per-image loop."""
        b, dev = len(images), images[0].device
        hs = torch.tensor([float(t.shape[1]) for t in images], device=dev).repeat(self.m)
        ws = torch.tensor([float(t.shape[2]) for t in images], device=dev).repeat(self.m)
        p = self.params(hs, ws, generator)
        out = torch.empty(self.m * b, 3, self.size, self.size, device=dev)
        groups: dict = {}
        for k, img in enumerate(images):
            groups.setdefault(tuple(img.shape[1:]), []).append(k)
        views = b * torch.arange(self.m, device=dev).unsqueeze(1)
        for ks in groups.values():
            src = torch.stack([images[k] for k in ks])
            src = src.float().div_(255) if src.dtype == torch.uint8 else src
            # view v of image k is row v*b + k (views first); src_index: the image's place in this group
            rows = (torch.tensor(ks, device=dev).unsqueeze(0) + views).reshape(-1)
            src_index = torch.arange(len(ks), device=dev).repeat(self.m)
            out[rows] = self.crop.resample(src, p, src_index, rows)
        return apply(self.rest, out, p)
