"""The batched (fast-path) augmentation against the reference torchvision/PIL transforms.

Three kinds of checks: (1) each batched op equals torchvision's own op on each image, (2) the
random parameters follow the reference distributions, (3) pixel statistics of augmented real
CIFAR-10 views match the reference pipeline's. All run on CPU tensors.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision import transforms as T

from simclr.data import get_dataset, maybe_subset
from simclr.data.augment import AugSpec, BatchAugment, sample_params, simclr_transform
from simclr.data.batch_aug import adjust_hue, color_jitter, gaussian_blur, per_view, resized_crops

N = 20000  # views per distribution test: a rate's standard error is <= 0.0035


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (max |CDF_a - CDF_b|)."""
    grid = np.union1d(a, b)
    ca = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(ca - cb).max())


# ---------------------------------------------------------------------------- ops vs torchvision
def test_jitter_equals_torchvision_ops_in_each_images_own_order():
    torch.manual_seed(0)
    x = torch.rand(24, 3, 16, 16)
    order = torch.tensor(list(itertools.permutations(range(4))))  # all 24 orders, one per image
    factors = torch.stack([torch.rand(24) * 1.6 + 0.2, torch.rand(24) * 1.6 + 0.2, torch.rand(24) * 1.6 + 0.2,
                           torch.rand(24) * 0.4 - 0.2], dim=1)
    apply = torch.rand(24) < 0.8
    out = color_jitter(x, order, factors, apply)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for k in range(24):
        ref = x[k]
        if apply[k]:
            for op in order[k].tolist():
                ref = ops[op](ref, float(factors[k, op]))
        assert torch.allclose(out[k], ref, atol=1e-5), k


def test_gpu_style_jitter_branch_equals_cpu_branch():
    # the sync-free formulation (whole-batch hue + select) used on GPUs, checked here on CPU tensors
    torch.manual_seed(5)
    x = torch.rand(32, 3, 8, 8)
    p = sample_params(torch.full((32,), 8.0), torch.full((32,), 8.0), _gen(5))
    a = color_jitter(x, p.order, p.factors, p.jitter, sync_free=True)
    b = color_jitter(x, p.order, p.factors, p.jitter, sync_free=False)
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, x)


def test_hue_and_blur_equal_torchvision():
    torch.manual_seed(1)
    x = torch.rand(5, 3, 20, 20)
    shift = torch.tensor([-0.5, -0.2, 0.0, 0.13, 0.5])
    for k in range(5):
        assert torch.allclose(adjust_hue(x[k:k + 1], shift[k:k + 1])[0], TF.adjust_hue(x[k], float(shift[k])),
                              atol=1e-5)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    apply = torch.tensor([True, True, False, True, True])
    out = gaussian_blur(x, sigma, 7, apply)
    for k in range(5):
        ref = TF.gaussian_blur(x[k], [7, 7], [float(sigma[k])] * 2) if apply[k] else x[k]
        assert torch.allclose(out[k], ref, atol=1e-5)


def test_crop_resampling_matches_independent_paths():
    torch.manual_seed(2)
    x = torch.rand(2, 3, 32, 32)
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [3.0, 5.0, 19.0, 29.0], [10.0, 0.0, 30.0, 15.0]])
    src = torch.tensor([0, 1, 0])
    # the whole image at its own size is the identity, for both kernels
    for interp in ("bilinear", "bicubic"):
        assert torch.allclose(resized_crops(x, boxes[:1], src[:1], 32, interp)[0], x[0], atol=1e-5)
    # bilinear roi_align == bilinear grid_sample over the same box (no shrinking: one sample per pixel)
    bil = resized_crops(x, boxes, src, 32, "bilinear")
    theta = torch.zeros(3, 2, 3)
    x1, y1, x2, y2 = boxes.unbind(1)
    theta[:, 0, 0], theta[:, 0, 2] = (x2 - x1) / 32, (x1 + x2) / 32 - 1
    theta[:, 1, 1], theta[:, 1, 2] = (y2 - y1) / 32, (y1 + y2) / 32 - 1
    grid = torch.nn.functional.affine_grid(theta, [3, 3, 32, 32], align_corners=False)
    ref = torch.nn.functional.grid_sample(x[src], grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert torch.allclose(bil, ref, atol=1e-5)
    # interior of a bicubic enlargement == torch's bicubic interpolate of the cropped patch
    bic = resized_crops(x, boxes[1:2], src[1:2], 32, "bicubic")[0]
    patch = TF.crop(x[1], 5, 3, 24, 16)
    up = torch.nn.functional.interpolate(patch[None], size=(32, 32), mode="bicubic", align_corners=False)[0]
    assert torch.allclose(bic[:, 4:-4, 4:-4], up.clamp(0, 1)[:, 4:-4, 4:-4], atol=1e-5)


def test_bicubic_crops_equal_grid_sample_on_the_box_grid():
    """The separable (matrix) bicubic resampling against torch's grid_sample (bicubic, border, the box's affine
    grid): random boxes, square and oblong sources, enlarged and same-size crops, STL-10's 96 px."""
    import torch.nn.functional as F
    torch.manual_seed(3)
    for h, w, size in ((32, 32, 32), (24, 40, 32), (96, 96, 96)):
        x = torch.rand(8, 3, h, w)
        n = 64
        cw, ch = torch.randint(1, w + 1, (n,)).float(), torch.randint(1, h + 1, (n,)).float()
        left, top = (torch.rand(n) * (w - cw + 1)).floor(), (torch.rand(n) * (h - ch + 1)).floor()
        boxes = torch.stack([left, top, left + cw, top + ch], 1)
        src = torch.randint(0, 8, (n,))
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = cw / w, (2 * left + cw) / w - 1
        theta[:, 1, 1], theta[:, 1, 2] = ch / h, (2 * top + ch) / h - 1
        grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
        ref = F.grid_sample(x[src], grid, mode="bicubic", padding_mode="border", align_corners=False).clamp(0, 1)
        out = resized_crops(x, boxes, src, size, "bicubic")
        assert out.shape == ref.shape and out.is_contiguous()
        assert torch.allclose(out, ref, atol=5e-5), (h, w, size, (out - ref).abs().max())


def test_per_view_selection_is_where_exactly():
    torch.manual_seed(4)
    a, b = torch.rand(16, 3, 8, 8), torch.rand(16, 3, 8, 8)
    mask = torch.rand(16) < 0.5
    assert torch.equal(per_view(mask, a, b), torch.where(mask.view(-1, 1, 1, 1), a, b))
    gray = torch.rand(16, 1, 8, 8)  # a broadcast operand, as the grayscale op passes it
    assert torch.equal(per_view(mask, gray.expand_as(a), a), torch.where(mask.view(-1, 1, 1, 1), gray, a))


# ---------------------------------------------------------------------------- parameter distributions
def test_crop_parameters_follow_torchvision_random_resized_crop():
    side = torch.full((N,), 32.0)
    p = sample_params(side, side, _gen(), scale_lower=0.08)
    x1, y1, x2, y2 = p.boxes.unbind(1)
    w, h = (x2 - x1).numpy(), (y2 - y1).numpy()
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 32).all() and (y2 <= 32).all()
    assert torch.equal(p.boxes, p.boxes.round())  # integer pixel boxes, like torchvision's
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    ref = np.array([T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(5000)])
    rh, rw = ref[:, 2], ref[:, 3]
    area, rarea = w * h / 1024, rw * rh / 1024
    ratio, rratio = w / h, rw / rh
    assert area.min() >= 0.07 and area.max() <= 1.0 and 0.7 <= ratio.min() and ratio.max() <= 1.43
    # KS critical value at alpha = 0.001 for 20000 vs 5000 samples: 1.95 * sqrt(25000 / 1e8) = 0.031
    assert _ks(area, rarea) < 0.031
    assert _ks(ratio, rratio) < 0.031
    # offsets uniform over the allowed positions: the mid-point-normalised offset has mean 1/2 (sd 0.29)
    for off, size in ((x1.numpy(), w), (y1.numpy(), h)):
        assert abs(((off + 0.5) / (32 - size + 1)).mean() - 0.5) < 0.008
    assert abs(area.mean() - rarea.mean()) < 0.01


def test_crop_fallback_on_extreme_aspect_is_torchvision_centre_crop():
    # a 10x100 image: no 3/4..4/3 crop of >= 90% area exists, so every view is the centre fallback
    p = sample_params(torch.full((50,), 10.0), torch.full((50,), 100.0), _gen(), scale_lower=0.9)
    i, j, h, w = T.RandomResizedCrop.get_params(torch.zeros(3, 10, 100), (0.9, 1.0), (3 / 4, 4 / 3))
    assert (p.boxes == torch.tensor([j, i, j + w, i + h], dtype=torch.float32)).all()


def _assert_uniform(v: torch.Tensor, lo: float, hi: float) -> None:
    """N draws are U[lo, hi]: inside, reaching both ends (expected gap (hi - lo) / N), and with the
    uniform CDF (KS critical value at alpha = 0.001: 1.95 / sqrt(20000) = 0.014). A range too narrow
    or too wide, or shifted, fails; bounds alone would let a narrower range pass."""
    x = np.sort(v.double().numpy())
    n, width = len(x), hi - lo
    assert lo - 1e-6 <= x[0] and x[-1] <= hi + 1e-6, (x[0], x[-1], lo, hi)
    assert x[0] - lo < 0.001 * width and hi - x[-1] < 0.001 * width, (x[0], x[-1], lo, hi)
    assert np.abs(np.arange(1, n + 1) / n - (x - lo) / width).max() < 0.014


def test_flip_jitter_gray_blur_rates_and_factor_ranges():
    side = torch.full((N,), 224.0)
    p = sample_params(side, side, _gen(3), color_dist_s=1.0, blur=True)
    assert abs(p.flip.float().mean().item() - 0.5) < 0.015
    assert abs(p.jitter.float().mean().item() - 0.8) < 0.015
    assert abs(p.gray.float().mean().item() - 0.2) < 0.015
    assert abs(p.blur.float().mean().item() - 0.5) < 0.015
    _assert_uniform(p.sigma, 0.1, 2.0)
    f = p.factors
    for k in range(3):  # brightness, contrast, saturation: U[1 - 0.8s, 1 + 0.8s]
        _assert_uniform(f[:, k], 0.2, 1.8)
    _assert_uniform(f[:, 3], -0.2, 0.2)  # hue: U[-0.2s, 0.2s]
    # each of the 24 op orders about equally often (torch.randperm(4) in torchvision)
    counts = torch.unique(p.order, dim=0, return_counts=True)[1]
    assert len(counts) == 24 and (counts.float() / N - 1 / 24).abs().max() < 0.01
    # independence of the choices (flip vs gray) within 4 standard errors
    assert abs((p.flip & p.gray).float().mean().item() - 0.1) < 0.009
    # weaker colour strength shrinks the ranges; strength 0 turns jitter off
    q = sample_params(side, side, _gen(4), color_dist_s=0.5)
    _assert_uniform(q.factors[:, 0], 0.6, 1.4)
    _assert_uniform(q.factors[:, 3], -0.1, 0.1)
    assert not sample_params(side[:100], side[:100], _gen(), color_dist_s=0.0).jitter.any()


def test_no_blur_for_cifar_by_default():
    aug = BatchAugment(AugSpec(32), 2)
    sizes = torch.full((100,), 32.0)
    assert aug.blur_kernel == 0 and not aug.params(sizes, sizes, _gen()).blur.any()
    assert BatchAugment(AugSpec(224), 2).blur_kernel == 23 and BatchAugment(AugSpec(32, blur="on"), 2).blur_kernel == 3


# ---------------------------------------------------------------------------- pixel statistics
@pytest.fixture(scope="module")
def cifar_views(data_root):
    """1000 real CIFAR-10 training images, two views each: reference pipeline vs fast path."""
    ds = maybe_subset(get_dataset("cifar10", "train"), 1000, seed=1)
    transform = simclr_transform(32)
    torch.manual_seed(0)
    ref = torch.stack([transform(ds.load(i)) for i in range(len(ds)) for _ in range(2)])
    imgs = torch.from_numpy(ds.images).permute(0, 3, 1, 2).float() / 255
    out = {"reference": ref}
    for interp in ("auto", "bilinear"):
        g = _gen(0)
        aug = BatchAugment(AugSpec(32, interpolation=interp), 2)
        out[interp] = torch.cat([aug(imgs[i:i + 500], g) for i in range(0, 1000, 500)])
    return out


def _pixel_stats(v: torch.Tensor) -> dict:
    lum = 0.2989 * v[:, 0] + 0.587 * v[:, 1] + 0.114 * v[:, 2]
    colour = (v - lum[:, None]).abs().mean((1, 2, 3))  # 0 for a gray view
    return {"mean": v.mean((0, 2, 3)), "std": v.std((0, 2, 3)), "colour": colour.mean().item(),
            "contrast": v.std((1, 2, 3)).mean().item(),
            "sharpness": (v[..., 1:] - v[..., :-1]).abs().mean().item(),
            "gray_frac": (colour < 1e-3).float().mean().item()}


def test_pixel_statistics_match_reference_transforms(cifar_views):
    """Tolerances: 2000 views each; sampling standard errors are about 0.001 (colour), 0.002
    (contrast), 0.0005 (sharpness); per-channel mean/std tolerance 0.01 (measured gaps <= 0.004)."""
    ref = _pixel_stats(cifar_views["reference"])
    fast = _pixel_stats(cifar_views["auto"])
    assert cifar_views["auto"].shape == (2000, 3, 32, 32)
    assert 0 <= cifar_views["auto"].min() and cifar_views["auto"].max() <= 1
    assert (fast["mean"] - ref["mean"]).abs().max() < 0.01
    assert (fast["std"] - ref["std"]).abs().max() < 0.01
    assert abs(fast["colour"] - ref["colour"]) < 0.004
    assert abs(fast["contrast"] - ref["contrast"]) < 0.008
    assert abs(fast["gray_frac"] - ref["gray_frac"]) < 0.035
    assert abs(fast["sharpness"] / ref["sharpness"] - 1) < 0.06  # bicubic on CIFAR: as sharp as PIL's


def test_bilinear_resampling_effect_is_a_small_blur(cifar_views):
    """The documented cost of bilinear on CIFAR: views a little less sharp (measured about -10%),
    colour and contrast unchanged."""
    ref = _pixel_stats(cifar_views["reference"])
    bil = _pixel_stats(cifar_views["bilinear"])
    assert 0.8 < bil["sharpness"] / ref["sharpness"] < 0.97
    assert abs(bil["colour"] - ref["colour"]) < 0.004 and (bil["mean"] - ref["mean"]).abs().max() < 0.01


def test_every_view_has_its_own_parameters():
    x = torch.rand(1, 3, 32, 32).expand(64, 3, 32, 32).contiguous()  # one image, 64 copies
    v = BatchAugment(AugSpec(32), 2)(x, _gen())
    flat = v.reshape(128, -1)
    assert torch.cdist(flat, flat).add(torch.eye(128) * 1e3).min() > 1e-3  # no two views alike
