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
    x1, y1, x2, y2 = boxes.to(src.dtype).unbind(1)
    rows = bicubic_matrix(y1, y2 - y1, size, src.shape[-2])  # (N, size, H)
    cols = bicubic_matrix(x1, x2 - x1, size, src.shape[-1])  # (N, size, W)
    # by hand: the crop boxes are axis-aligned, so the bicubic resampling is separable: two batched matrix products
    # (rows @ image @ cols^T), a few MFLOP, where grid_sample's per-pixel 4 x 4 gathers (and affine_grid's grid)
    # took 40% of the CPU augmentation's time. Same weights and edge handling as grid_sample(mode="bicubic",
    # padding_mode="border", align_corners=False) on the box's grid (tested against it).
    n, c, h, w = len(src_index), src.shape[1], src.shape[-2], src.shape[-1]
    x = torch.bmm(src[src_index].reshape(n, c * h, w), cols.transpose(1, 2))  # (N, C*H, size): the columns
    x = x.view(n, c, h, size).transpose(1, 2).reshape(n, h, c * size)
    out = torch.bmm(rows, x).clamp_(0, 1)  # then the rows
    return out.view(n, size, c, size).transpose(1, 2).contiguous()  # (N, C, size, size)


CUBIC_A = -0.75  # the cubic convolution coefficient of torch's bicubic grid_sample and interpolate


def bicubic_matrix(start: torch.Tensor, length: torch.Tensor, size: int, side: int) -> torch.Tensor:
    """(N, size, side): row i of matrix k holds the bicubic weights that output pixel i of a crop from ``start[k]``
    spanning ``length[k]`` pixels (pixel-edge coordinates) takes from the source's ``side`` pixels. Output pixel
    centres map linearly onto the crop (align_corners=False); taps beyond the edge take the edge pixel."""
    i = torch.arange(size, device=start.device, dtype=start.dtype) + 0.5
    pos = start.unsqueeze(1) + length.unsqueeze(1) * (i / size) - 0.5  # source coordinate of each output centre
    first = pos.floor()
    t = pos - first
    a = CUBIC_A

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    weights = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)  # taps first-1 ... first+2
    taps = (first.long().unsqueeze(-1) + torch.arange(-1, 3, device=start.device)).clamp_(0, side - 1)
    m = torch.zeros(*pos.shape, side, device=start.device, dtype=start.dtype)
    return m.scatter_add_(2, taps, weights)


def per_view(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` for the views whose ``mask`` (N,) is set, ``b`` for the others: ``torch.where(mask.view(-1, 1, 1, 1), a,
    b)`` for finite values, as a lerp with weight 0 or 1, which is exact (lerp(b, a, 0) = b, lerp(b, a, 1) = a) and
    which a CPU runs 4x faster than where's broadcast mask (0.11 vs 0.45 ms for 256 CIFAR views, one thread)."""
    return torch.lerp(b, a, mask.to(b.dtype).view(-1, *[1] * (b.dim() - 1)))


_gray_weights: dict = {}  # GRAY_WEIGHTS per (device, dtype), copied there once


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma: one matrix product (5x faster on a CPU than the channels' weighted sum)."""
    key = (x.device, x.dtype)
    if key not in _gray_weights:
        _gray_weights[key] = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype)
    n, _, h, w = x.shape
    return torch.matmul(_gray_weights[key], x.reshape(n, 3, h * w)).view(n, 1, h, w)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of every image by ``shift[k]`` turns (torchvision's HSV formulas: hue from
    max/min, then the closed form RGB = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6H) mod 6)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    c = maxc - minc
    # hue in sixths: (g - b) / c where red is largest, 2 + (b - r) / c where green is, 4 + (r - g) / c otherwise
    is_r, is_g = maxc == r, (maxc == g) & (maxc != r)
    num = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    sixths = num / torch.where(c == 0, 1.0, c) + (2.0 * is_g + 4.0 * ~(is_r | is_g))
    # the two "mod"s below as subtractions, exact and the same values as torch.remainder's, for the ranges they
    # see (h / 6 + shift in [-2/3, 4/3], n + h in [1, 11)), at a third of its cost on a CPU
    turns = sixths / 6.0 + shift.view(-1, 1, 1)
    h = (turns - turns.floor()) * 6.0
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1 (no copy)
    k = n + h.unsqueeze(1)
    k = k - 6.0 * (k >= 6.0).to(x.dtype)
    return maxc.unsqueeze(1) - c.unsqueeze(1) * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def color_jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor, apply: torch.Tensor,
                 sync_free: Optional[bool] = None) -> torch.Tensor:
    """torchvision's ColorJitter, every image with its own factors and its own op order.

    Position by position, each image runs the op its order names there: brightness, contrast and
    saturation are one blend ``clamp(f * x + (1 - f) * other)`` (other = 0, the mean luma, the
    luma image; computed as a lerp, which is exact for the identity factor 1), hue a rotation. Images that skip
    jitter (or run hue at this position) get that identity factor. ``sync_free`` (default: on any
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
        # the blend's other image: the luma (saturation), its mean (contrast) or 0 (brightness); exact, as the
        # weights are 0 or 1
        is_sat, is_con = ((op == k).to(x.dtype).view(-1, 1, 1, 1) for k in (2, 1))
        other = lum * is_sat + lum.mean(dim=(1, 2, 3), keepdim=True) * is_con
        ratio = torch.where(op == 3, torch.ones_like(fk), fk).view(-1, 1, 1, 1)
        x = torch.lerp(other, x, ratio).clamp_(0, 1)
        if sync_free:
            x = per_view(is_hue, adjust_hue(x, torch.where(is_hue, fk, 0.0)), x)
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
    return per_view(apply, y, x)


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
