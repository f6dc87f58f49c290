"""The batched kernels of the SimCLR augmentation: tensor ops with per-view parameters, on any device.

The ops themselves (their options, random numbers and the two backends) are declared in :mod:`.augment`, which
calls these kernels for its batched backend (float (N, 3, H, W) in [0, 1]); the fast loader (:mod:`.fast`) feeds
them. They follow the reference recipe op by op:
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
  see tests/data/test_batch_aug.py; the accuracy effect is measured by
  ``benchmarks/time_to_accuracy.py --interpolation``.
* The reference jitters uint8 PIL images (every op rounds to 1/255); here all ops are in
  float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601 luma)
INTERPOLATIONS = ("auto", "bilinear", "bicubic")


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
