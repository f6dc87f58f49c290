"""The fast input pipeline: data on the device, augmentation as batched tensor ops.

Small datasets (CIFAR-10/100, STL-10: an in-memory uint8 array) are moved to the training
device once, as a uint8 (N, 3, H, W) tensor. Each step's images are picked with the same
step-indexed permutation as the reference loader (so both loaders see the same images at
the same step) and augmented in one batch: every view gets its own random parameters, all
drawn with one call from a ``torch.Generator`` seeded by (seed, step, rank). A step's batch
is therefore a function of (seed, step, rank) alone, and a resumed run sees exactly the
batches of the uninterrupted one.

Large datasets (ImageNet, image folders) are read by CPU DataLoader workers as raw file
bytes only; the JPEGs are decoded in one batched ``torchvision.io.decode_jpeg`` call on the
device (on the CPU when there is no GPU) and augmented there.

The augmentation follows the reference recipe of :mod:`.transforms` op by op:
random resized crop (scale [scale_lower, 1], ratio [3/4, 4/3], torchvision's 10-trial
rejection sampling and its centre-crop fallback), horizontal flip (p 0.5), colour jitter
(p 0.8; brightness, contrast, saturation, hue in a random order per image, torchvision's
formulas), grayscale (p 0.2), Gaussian blur (p 0.5, sigma U[0.1, 2], kernel 10% of the side,
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
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .loaders import StepBatches, epoch_permutation, ignore_stop_signals, sample_seed
from .transforms import blur_kernel_size, use_blur

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
                  scale_lower: float = 0.08, color_dist_s: float = 1.0, blur: bool = False) -> AugParams:
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
        sigma=0.1 + 1.9 * u[:, _U_SIGMA],
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
    ident = torch.ones(4, device=x.device, dtype=x.dtype)
    ident[3] = 0.0
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
                 color_dist_s: float = 1.0, blur: str = "auto", interpolation: str = "auto"):
        if interpolation not in INTERPOLATIONS:
            raise DataError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.size, self.m, self.scale_lower, self.s = image_size, multiplier, scale_lower, color_dist_s
        self.blur = use_blur(image_size, blur)
        self.blur_kernel = blur_kernel_size(image_size) if self.blur else 0
        self.interpolation = interpolation

    def params(self, heights: torch.Tensor, widths: torch.Tensor, generator: torch.Generator) -> AugParams:
        return sample_params(heights, widths, generator, self.scale_lower, self.s, self.blur)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x: (B, 3, H, W) float in [0, 1] -> (m*B, 3, S, S) ordered [view 1 of all; view 2; ...]."""
        b, _, h, w = x.shape
        n = self.m * b
        p = self.params(torch.full((n,), float(h), device=x.device), torch.full((n,), float(w), device=x.device),
                        generator)
        src = torch.arange(b, device=x.device).repeat(self.m)
        return augment_crops(resized_crops(x, p.boxes, src, self.size, self.interpolation), p, self.blur_kernel)

    def from_list(self, images: list, generator: torch.Generator) -> torch.Tensor:
        """Images of different sizes (a list of (3, H_k, W_k) float) -> (m*B, 3, S, S)."""
        b, dev = len(images), images[0].device
        hs = torch.tensor([float(t.shape[1]) for t in images], device=dev).repeat(self.m)
        ws = torch.tensor([float(t.shape[2]) for t in images], device=dev).repeat(self.m)
        p = self.params(hs, ws, generator)
        out = torch.empty(self.m * b, 3, self.size, self.size, device=dev)
        zero = torch.zeros(self.m, device=dev, dtype=torch.long)
        for k, img in enumerate(images):  # one resampling call per image (sizes differ), all m views at once
            rows = torch.arange(k, self.m * b, b, device=dev)
            out[rows] = resized_crops(img.unsqueeze(0), p.boxes[rows], zero, self.size, self.interpolation)
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


# --------------------------------------------------------------------------------------------
# file datasets: bytes in CPU workers, decoding on the device
# --------------------------------------------------------------------------------------------
def _file_list(images) -> Optional[list]:
    files = getattr(images, "files", None)
    if files is not None:
        return list(files)
    base = getattr(images, "base", None)
    if base is not None and getattr(base, "files", None) is not None:
        return [base.files[i] for i in images.indices]
    return None


class _RawItems(Dataset):
    """Item i -> (file bytes as a uint8 1-d tensor, or an already decoded (3, H, W) uint8 tensor
    for datasets without files, label)."""

    def __init__(self, images, files: Optional[list]):
        self.images, self.files = images, files

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        if self.files is not None:
            try:
                data = torch.from_numpy(np.fromfile(self.files[i], dtype=np.uint8))
            except OSError as e:
                raise DataError(f"cannot read image {self.files[i]}: {e}") from None
            return data, i
        arr = np.asarray(self.images.load(i).convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), i


def _collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


class _StepIndices:
    """Re-iterable batch sampler: this process's dataset indices for steps [start, end)."""

    def __init__(self, steps: StepBatches, start: int, end: int):
        self.steps, self.start, self.end = steps, start, end

    def __iter__(self):
        return (self.steps.indices(s) for s in range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8


def decode_batch(items: list, device: torch.device, files: Optional[list] = None, indices: Optional[list] = None,
                 skip_bad: bool = False, bad: Optional[list] = None) -> list:
    """Raw items -> list of (3, H, W) uint8 on ``device``. JPEGs are decoded in one batched
    ``decode_jpeg`` call on the device (nvJPEG on CUDA); anything else, or a batch the device
    decoder rejects, is decoded image by image on the CPU."""
    with warnings.catch_warnings():  # torchvision 0.29 announces (at every call) a move to TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return _decode_batch(items, device, files, indices, skip_bad, bad)


def _decode_batch(items, device, files, indices, skip_bad, bad) -> list:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    out: list = [None] * len(items)
    jpeg = [k for k, t in enumerate(items) if t.dim() == 1 and _is_jpeg(t)]
    if jpeg:
        try:
            dec = decode_jpeg([items[k] for k in jpeg], mode=ImageReadMode.RGB, device=device)
            for k, t in zip(jpeg, dec):
                out[k] = t
        except RuntimeError:
            pass  # e.g. a CMYK or broken JPEG in the batch: fall back image by image below
    for k, t in enumerate(items):
        if out[k] is not None:
            continue
        if t.dim() == 3:
            out[k] = t.to(device, non_blocking=True)
            continue
        try:
            out[k] = decode_image(t, mode=ImageReadMode.RGB).to(device, non_blocking=True)
        except RuntimeError as e:
            name = files[indices[k]] if files is not None and indices is not None else f"item {k}"
            if not skip_bad:
                why = str(e).splitlines()[0].split(", ")[-1]  # drop torchvision's C++ source location
                raise DataError(f"cannot decode image {name}: {why}. Remove or replace the file, or pass "
                                f"--skip_bad_images true to skip unreadable files.") from None
            if bad is not None:
                bad.append(str(name))
    good = [t for t in out if t is not None]
    if not good:
        raise DataError("no decodable image in a batch")
    # a skipped image is replaced by another image of the same batch, so the batch keeps its size
    return [t if t is not None else good[k % len(good)] for k, t in enumerate(out)]


# --------------------------------------------------------------------------------------------
# the batch source
# --------------------------------------------------------------------------------------------
class _cpu_threads:
    """Run the augmentation's elementwise passes single-threaded on the CPU: they are small and
    memory-bound, and on a shared few-core machine OpenMP's fan-out made them 10x slower
    (measured here: 0.17 s vs 2-5 s for 512 CIFAR views). No effect on other devices."""

    def __init__(self, device: torch.device, n: int):
        self.active, self.n = device.type == "cpu", n

    def __enter__(self):
        if self.active:
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.old)


def _prefetched(it: Iterator, depth: int = 2) -> Iterator:
    """Run the iterator ``it`` in a background thread, ``depth`` items ahead (torch ops release the GIL,
    so on a CPU the augmentation of the next step overlaps the current step's compute). The items and
    their order are exactly those of ``it``; an exception in the thread is re-raised here."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        torch.set_num_threads(1)  # per-thread setting (OpenMP): the training thread keeps its own
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=produce, daemon=True, name="simclr-prefetch")
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


class FastLoader:
    """Batch source (see :mod:`.loaders`) with batched tensor augmentation on ``device``."""

    def __init__(self, cfg, images, device: torch.device, rank: int = 0, world: int = 1,
                 interpolation: str = "auto"):
        self.device, self.rank, self.seed, self.m = torch.device(device), rank, int(cfg.seed), cfg.multiplier
        self.size = images.image_size
        self.aug_enabled = bool(cfg.aug)
        self.augment = BatchAugment(self.size, cfg.multiplier, cfg.scale_lower, cfg.color_dist_s, cfg.blur,
                                    interpolation)
        self.steps = StepBatches(len(images), cfg.batch_size, cfg.seed, rank, world)
        self.steps_per_epoch = self.steps.steps_per_epoch
        self.workers = cfg.workers
        self.images = images
        self.targets = torch.as_tensor(np.asarray(images.targets, dtype=np.int64)).to(self.device)
        arr = getattr(images, "images", None)
        self.data = None
        if arr is not None:  # the whole dataset on the device, uint8 (N, 3, H, W)
            self.data = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device).permute(0, 3, 1, 2).contiguous()
        self.files = None if arr is not None else _file_list(images)
        self.generator = torch.Generator(device=self.device)
        self._perm_epoch, self._perm = -1, None

    def step_generator(self, step: int) -> torch.Generator:
        """The generator of step ``step`` on this rank: seeded by (seed, step, rank)."""
        return self.generator.manual_seed(sample_seed(self.seed, step, self.rank))

    def _indices(self, step: int) -> torch.Tensor:
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:  # one host->device copy per epoch; slicing it is free
            self._perm = epoch_permutation(self.steps.n, self.seed, epoch).to(self.device)
            self._perm_epoch = epoch
        lo = b * self.steps.batch + self.rank * self.steps.local
        return self._perm[lo:lo + self.steps.local]

    def _views(self, x: torch.Tensor, step: int) -> torch.Tensor:
        if not self.aug_enabled:
            return center_view(x, self.size).repeat(self.m, 1, 1, 1)
        with _cpu_threads(self.device, 1):
            return self.augment(x, self.step_generator(step))

    def batches(self, start: int, end: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.data is not None:
            if self.device.type == "cpu":  # build step s+1's views on the other core while step s trains
                yield from _prefetched(self._array_batches(start, end), depth=2)
            else:  # on a GPU the augmentation kernels are simply queued ahead of the step
                yield from self._array_batches(start, end)
            return
        yield from self._file_batches(start, end)

    def _array_batches(self, start: int, end: int):
        for s in range(start, end):
            idx = self._indices(s)
            x = self.data[idx].float().div_(255)
            yield self._views(x, s), self.targets[idx]

    def _file_batches(self, start: int, end: int):
        loader = DataLoader(_RawItems(self.images, self.files), batch_sampler=_StepIndices(self.steps, start, end),
                            num_workers=self.workers, collate_fn=_collate, pin_memory=False,
                            prefetch_factor=4 if self.workers else None, worker_init_fn=ignore_stop_signals)
        skip = getattr(self.images, "skip_bad_images", False)
        bad = getattr(self.images, "bad_images", None)
        for s, (items, idx) in zip(range(start, end), loader):
            dec = decode_batch(items, self.device, self.files, idx, skip, bad)
            imgs = [t.float().div_(255) for t in dec]
            y = self.targets[torch.as_tensor(idx, device=self.device)]
            if not self.aug_enabled:
                yield torch.cat([center_view(t.unsqueeze(0), self.size) for t in imgs]).repeat(self.m, 1, 1, 1), y
                continue
            with _cpu_threads(self.device, 1):
                x = self.augment.from_list(imgs, self.step_generator(s))
            yield x, y
