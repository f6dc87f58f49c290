"""Batched SimCLR augmentation as tensor ops: every view its own random parameters, one call per batch.

All parameters of a batch's views are drawn with one call from a ``torch.Generator``, so the
views are a function of the generator's seed alone; the ops run on any device (float
(N, 3, H, W) in [0, 1]). The fast loader (:mod:`.fast`) feeds them.

The augmentation follows the reference recipe of :mod:`.transforms` op by op:
random resized crop (scale [scale_lower, 1], ratio [3/4, 4/3], torchvision's 10-trial
rejection sampling and its centre-crop fallback), horizontal flip (p 0.5), colour jitter
(p 0.8; brightness, contrast, saturation, hue in a random order per image, torchvision's
formulas), grayscale (p 0.2), Gaussian blur (p 0.5, sigma U[0.1, 2] or --blur_sigma, kernel 10% of the side,
reflect padding; only for images >= 64 px unless --blur says otherwise), clamp to [0, 1].

Two documented differences from the reference:
* Resampling. The reference resizes crops with PIL bicubic. ``interpolation="auto"`` (the
  default) uses ``grid_sample`` **bicubic** when crops can only be enlarged (the image is not
  larger than the network input: CIFAR, STL-10 at 96 px) — there it matches the reference's
  sharpness — and **bilinear** ``roi_align`` with adaptive sampling otherwise (ImageNet-size
  images), which averages several samples per output pixel when a crop is shrunk, i.e. it
  antialiases like PIL does; plain bicubic sampling would alias. On CIFAR, bilinear views are
  about 10% less sharp than the reference's (mean |horizontal gradient|; bicubic within 4%),
  see tests/test_fast_aug.py; the accuracy effect is measured by
  ``benchmarks/time_to_accuracy.py --interpolation``.
* The reference jitters uint8 PIL images (every op rounds to 1/255); here all ops are in
  float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import DataError
from ..names import blur_sigma_range
from .transforms import OFFICIAL_BLUR_SIGMA, blur_kernel_size, use_blur

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601 luma)
INTERPOLATIONS = ("auto", "bilinear", "bicubic")
_RATIO = (3 / 4, 4 / 3)
_TRIALS = 10  # torchvision's RandomResizedCrop tries 10 times before falling back to a centre crop
# Layout of the per-view uniform numbers drawn in one call (see sample_params).
_U_AREA, _U_RATIO = slice(0, 10), slice(10, 20)
_U_TOP, _U_LEFT, _U_FLIP, _U_JITTER = 20, 21, 22, 23
_U_ORDER, _U_FACTORS = slice(24, 28), slice(28, 32)
_U_GRAY, _U_BLUR, _U_SIGMA = 32, 33, 34
N_UNIFORMS = 35


@dataclass
class AugParams:
    """Random parameters of N views. boxes: (N, 4) crop x1, y1, x2, y2 in pixel-edge coordinates
    of the source image; order: (N, 4) op index at each jitter position (0 brightness, 1 contrast,
    2 saturation, 3 hue); factors: (N, 4) the four jitter factors in that op numbering."""

    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor


def jitter_ranges(s: float) -> torch.Tensor:
    """(4, 2) [low, high] of brightness, contrast, saturation, hue for colour strength s
    (torchvision's ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) ranges)."""
    v = 0.8 * s
    h = min(0.2 * s, 0.5)
    return torch.tensor([[max(0.0, 1 - v), 1 + v]] * 3 + [[-h, h]], dtype=torch.float32)


_RANGES: dict = {}


def _device_ranges(s: float, device: torch.device) -> torch.Tensor:
    """jitter_ranges(s) on ``device``, copied there once (not at every step)."""
    key = (float(s), str(device))
    if key not in _RANGES:
        _RANGES[key] = jitter_ranges(s).to(device)
    return _RANGES[key]


def sample_params(heights: torch.Tensor, widths: torch.Tensor, generator: torch.Generator,
                  scale_lower: float = 0.08, color_dist_s: float = 1.0, blur: bool = False,
                  blur_sigma: tuple = OFFICIAL_BLUR_SIGMA) -> AugParams:
    """Draw the parameters of N views (heights/widths: (N,) float source sizes, on the device).

    The crop follows torchvision's ``RandomResizedCrop.get_params`` exactly (10 trials,
    rounding, the centre-crop fallback), vectorised over the batch.
    """
    n, dev = heights.shape[0], heights.device
    u = torch.rand(n, N_UNIFORMS, generator=generator, device=dev)
    hh, ww = heights.float().unsqueeze(1), widths.float().unsqueeze(1)
    area = hh * ww * (scale_lower + (1 - scale_lower) * u[:, _U_AREA])
    lo, hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, _U_RATIO])
    cw = torch.round(torch.sqrt(area * aspect))
    ch = torch.round(torch.sqrt(area / aspect))
    ok = (cw > 0) & (cw <= ww) & (ch > 0) & (ch <= hh)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first successful trial
    found = ok.any(dim=1)
    cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
    hh, ww = hh.squeeze(1), ww.squeeze(1)
    # fallback: the whole image, or its centre cut to the nearest allowed ratio
    in_ratio = ww / hh
    fw = torch.where(in_ratio > _RATIO[1], torch.round(hh * _RATIO[1]), ww)
    fh = torch.where(in_ratio < _RATIO[0], torch.round(ww / _RATIO[0]), hh)
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    top = torch.minimum(torch.floor(u[:, _U_TOP] * (hh - ch + 1)), hh - ch)
    left = torch.minimum(torch.floor(u[:, _U_LEFT] * (ww - cw + 1)), ww - cw)
    top = torch.where(found, top, torch.div(hh - ch, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(ww - cw, 2, rounding_mode="floor"))
    boxes = torch.stack([left, top, left + cw, top + ch], dim=1)

    rng = _device_ranges(color_dist_s, dev)
    factors = rng[:, 0] + (rng[:, 1] - rng[:, 0]) * u[:, _U_FACTORS]
    return AugParams(
        boxes=boxes,
        flip=u[:, _U_FLIP] < 0.5,
        jitter=(u[:, _U_JITTER] < 0.8) & (color_dist_s > 0),
        order=torch.argsort(u[:, _U_ORDER], dim=1),  # a uniformly random permutation of the 4 ops
        factors=factors,
        gray=u[:, _U_GRAY] < 0.2,
        blur=(u[:, _U_BLUR] < 0.5) & blur,
        sigma=blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * u[:, _U_SIGMA],
    )


# --------------------------------------------------------------------------------------------
# the batched ops (any device; float (N, 3, H, W) in [0, 1])
# --------------------------------------------------------------------------------------------
def resized_crops(src: torch.Tensor, boxes: torch.Tensor, src_index: torch.Tensor, size: int,
                  interpolation: str = "auto") -> torch.Tensor:
    """Crop ``boxes[k]`` of image ``src[src_index[k]]`` and resize it to size x size.

    src: (B, C, H, W) float; boxes: (N, 4) x1, y1, x2, y2 with pixel i spanning [i, i+1);
    returns (N, C, size, size).
    """
    if interpolation == "auto":
        interpolation = "bicubic" if max(src.shape[-2:]) <= size else "bilinear"
    if interpolation == "bilinear":
        from torchvision.ops import roi_align
        rois = torch.cat([src_index.to(boxes.dtype).unsqueeze(1), boxes], dim=1)
        return roi_align(src, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if interpolation != "bicubic":
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    h, w = src.shape[-2:]
    x1, y1, x2, y2 = boxes.unbind(1)
    theta = torch.zeros(boxes.shape[0], 2, 3, device=src.device, dtype=src.dtype)
    # output pixel centres map linearly onto the box (align_corners=False convention)
    theta[:, 0, 0] = (x2 - x1) / w
    theta[:, 0, 2] = (x1 + x2) / w - 1
    theta[:, 1, 1] = (y2 - y1) / h
    theta[:, 1, 2] = (y1 + y2) / h - 1
    grid = F.affine_grid(theta, [boxes.shape[0], src.shape[1], size, size], align_corners=False)
    out = F.grid_sample(src[src_index], grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of every image by ``shift[k]`` turns (torchvision's HSV formulas: hue from
    max/min, then the closed form RGB = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6H) mod 6)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    c = maxc - minc
    cdiv = torch.where(c == 0, torch.ones_like(c), c)
    rc, gc, bc = (maxc - r) / cdiv, (maxc - g) / cdiv, (maxc - b) / cdiv
    is_r, is_g = maxc == r, (maxc == g) & (maxc != r)
    h = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.remainder(h / 6.0 + shift.view(-1, 1, 1), 1.0) * 6.0
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1 (no copy)
    k = torch.remainder(n + h.unsqueeze(1), 6.0)
    return maxc.unsqueeze(1) - c.unsqueeze(1) * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def color_jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor, apply: torch.Tensor,
                 sync_free: Optional[bool] = None) -> torch.Tensor:
    """torchvision's ColorJitter, every image with its own factors and its own op order.

    Position by position, each image runs the op its order names there: brightness, contrast and
    saturation are one blend ``clamp(f * x + (1 - f) * other)`` (other = 0, the mean luma, the
    luma image), hue a rotation. Images that skip jitter (or run hue at this position) get the
    blend's identity factor 1, which is exact in floating point. ``sync_free`` (default: on any
    device but the CPU) rotates the whole batch and selects, instead of indexing the images
    whose op is hue, which would make the host wait for the device to count them.
    """
    if sync_free is None:
        sync_free = x.device.type != "cpu"
    # identity factors 1, 1, 1 and hue shift 0, made on the device (assigning a Python number copies it there)
    ident = (torch.arange(4, device=x.device) < 3).to(x.dtype)
    f = torch.where(apply.unsqueeze(1), factors.to(x.dtype), ident)
    for pos in range(4):
        op = order[:, pos]
        fk = f.gather(1, op.unsqueeze(1)).squeeze(1)
        is_hue = (op == 3) & apply
        lum = grayscale(x)
        other = torch.where((op == 1).view(-1, 1, 1, 1), lum.mean(dim=(1, 2, 3), keepdim=True), lum)
        other = other * (op != 0).view(-1, 1, 1, 1).to(x.dtype)
        ratio = torch.where(op == 3, torch.ones_like(fk), fk).view(-1, 1, 1, 1)
        x = (ratio * x + (1 - ratio) * other).clamp_(0, 1)
        if sync_free:
            x = torch.where(is_hue.view(-1, 1, 1, 1), adjust_hue(x, torch.where(is_hue, fk, 0.0)), x)
        else:  # rotate only the images whose op here is hue (counting them is free on the CPU)
            rows = is_hue.nonzero().squeeze(1)
            x[rows] = adjust_hue(x[rows], fk[rows])
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int, apply: torch.Tensor) -> torch.Tensor:
    """torchvision's GaussianBlur (separable kernel, reflect padding), sigma per image."""
    n, c, h, w = x.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.unsqueeze(0) / sigma.to(x.dtype).unsqueeze(1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, K)
    p = kernel_size // 2
    y = F.pad(x, (p, p, p, p), mode="reflect").reshape(1, n * c, h + 2 * p, w + 2 * p)
    y = F.conv2d(y, k.view(n * c, 1, kernel_size, 1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel_size), groups=n * c).view(n, c, h, w)
    return torch.where(apply.view(-1, 1, 1, 1), y, x)


def augment_crops(x: torch.Tensor, p: AugParams, blur_kernel: int) -> torch.Tensor:
    """Everything after the crop: flip, jitter, grayscale, blur, clamp. x: (N, 3, S, S)."""
    x = torch.where(p.flip.view(-1, 1, 1, 1), x.flip(-1), x)
    x = color_jitter(x, p.order, p.factors, p.jitter)
    x = torch.where(p.gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    if bool(blur_kernel):
        x = gaussian_blur(x, p.sigma, blur_kernel, p.blur)
    return x.clamp_(0, 1)


class BatchAugment:
    """The SimCLR view generator for a batch: m independent views of each of B images."""

    def __init__(self, image_size: int, multiplier: int = 2, scale_lower: float = 0.08,
                 color_dist_s: float = 1.0, blur: str = "auto", interpolation: str = "auto",
                 blur_sigma=OFFICIAL_BLUR_SIGMA):
        if interpolation not in INTERPOLATIONS:
            raise DataError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.size, self.m, self.scale_lower, self.s = image_size, multiplier, scale_lower, color_dist_s
        self.blur = use_blur(image_size, blur)
        self.blur_kernel = blur_kernel_size(image_size) if self.blur else 0
        self.blur_sigma = blur_sigma_range(blur_sigma)
        self.interpolation = interpolation

    def params(self, heights: torch.Tensor, widths: torch.Tensor, generator: torch.Generator) -> AugParams:
        return sample_params(heights, widths, generator, self.scale_lower, self.s, self.blur, self.blur_sigma)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x: (B, 3, H, W) float in [0, 1] -> (m*B, 3, S, S) ordered [view 1 of all; view 2; ...]."""
        b, _, h, w = x.shape
        n = self.m * b
        p = self.params(torch.full((n,), float(h), device=x.device), torch.full((n,), float(w), device=x.device),
                        generator)
        src = torch.arange(b, device=x.device).repeat(self.m)
        return augment_crops(resized_crops(x, p.boxes, src, self.size, self.interpolation), p, self.blur_kernel)

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
            out[rows] = resized_crops(src, p.boxes[rows], src_index, self.size, self.interpolation)
        return augment_crops(out, p, self.blur_kernel)


def center_view(x: torch.Tensor, size: int) -> torch.Tensor:
    """No augmentation (--aug false): the evaluation view, (B, 3, H, W) -> (B, 3, S, S)."""
    h, w = x.shape[-2:]
    if h == w == size:
        return x
    short = round(size / 0.875)
    scale = short / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                      antialias=True, align_corners=False).clamp_(0, 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]
