"""The reference augmentations: the paper's parameters and probabilities, measured over many draws."""
import numpy as np
import pytest
import torch
from PIL import Image
import torchvision.transforms.functional as TF
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from simclr.data.loaders import MultiViewDataset
from simclr.data.sampler import StepBatches
from simclr.data.augment import simclr_transform
from simclr.data.transforms import blur_kernel_size


def coord_image(side=200):
    """R encodes x, G encodes y (0..255), B = 128: a crop's corners reveal its box."""
    y, x = np.mgrid[0:side, 0:side]
    arr = np.stack([x * 255 // (side - 1), y * 255 // (side - 1), np.full_like(x, 128)], -1).astype(np.uint8)
    return Image.fromarray(arr)


def _resize(a: np.ndarray, side: int = 32) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((side, side), Image.BICUBIC))


def test_crop_area_and_aspect_ratio_within_bounds():
    t = simclr_transform(32, color_dist_s=1.0, scale_lower=0.08)
    crop = t.transforms[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.interpolation == InterpolationMode.BICUBIC
    assert crop.scale == pytest.approx((0.08, 1.0)) and crop.ratio == pytest.approx((3 / 4, 4 / 3))  # the paper's
    img = coord_image(200)
    arr = np.asarray(img)
    areas, ratios = [], []
    for seed in range(400):
        torch.manual_seed(seed)
        i, j, h, w = T.RandomResizedCrop.get_params(img, crop.scale, crop.ratio)
        areas.append(h * w / 200 ** 2)
        ratios.append(w / h)
        if seed < 20:  # the op itself crops exactly that box: the same draw, cut and resized by hand
            torch.manual_seed(seed)
            out = np.asarray(crop(img))
            assert out.shape == (32, 32, 3)
            assert np.array_equal(out, _resize(arr[i:i + h, j:j + w])), seed
            # and the coordinate image tells boxes apart: the box one pixel over looks different
            dj = 1 if j + w < 200 else -1
            assert not np.array_equal(out, _resize(arr[i:i + h, j + dj:j + dj + w])), seed
    areas, ratios = np.array(areas), np.array(ratios)
    assert areas.min() >= 0.08 - 0.01 and areas.max() <= 1.0
    assert ratios.min() >= 0.75 - 0.02 and ratios.max() <= 4 / 3 + 0.02
    assert 0.45 < areas.mean() < 0.6      # log-uniform ratio, uniform area in [0.08, 1] (clipped by the image)


def test_crop_box_read_back_from_pixels():
    crop = simclr_transform(32).transforms[0]
    img = coord_image(256)
    fracs = []
    torch.manual_seed(3)
    for _ in range(200):
        out = np.asarray(crop(img)).astype(float)
        width = (out[:, -1, 0].mean() - out[:, 0, 0].mean()) / 255 * 256 * 32 / 31
        height = (out[-1, :, 1].mean() - out[0, :, 1].mean()) / 255 * 256 * 32 / 31
        fracs.append(width * height / 256 ** 2)
        assert 0.7 < (width / height) < 1.43
    fracs = np.array(fracs)
    assert fracs.min() > 0.06 and fracs.max() < 1.05


@pytest.mark.parametrize("s", [0.5, 1.0])
def test_jitter_parameters_follow_strength(monkeypatch, s):
    t = simclr_transform(32, color_dist_s=s)
    apply_jitter, gray = t.transforms[2:4]
    assert isinstance(apply_jitter, T.RandomApply) and apply_jitter.p == 0.8
    assert isinstance(gray, T.RandomGrayscale) and gray.p == 0.2
    jitter = apply_jitter.transforms[0]
    # the factors the op really applies, recorded at torchvision's pixel functions, against the paper's
    # ranges written out here: brightness, contrast, saturation U[1 - 0.8s, 1 + 0.8s], hue U[-0.2s, 0.2s]
    want = {"brightness": (1 - 0.8 * s, 1 + 0.8 * s), "contrast": (1 - 0.8 * s, 1 + 0.8 * s),
            "saturation": (1 - 0.8 * s, 1 + 0.8 * s), "hue": (-0.2 * s, 0.2 * s)}
    seen: dict = {op: [] for op in want}
    calls: list = []
    for op in want:
        fn = getattr(TF, f"adjust_{op}")

        def record(img, factor, _op=op, _fn=fn):
            seen[_op].append(factor)
            calls[-1].append(_op)
            return _fn(img, factor)
        monkeypatch.setattr(TF, f"adjust_{op}", record)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    torch.manual_seed(0)
    n = 3000
    for _ in range(n):
        calls.append([])
        jitter(img)
    assert all(sorted(c) == sorted(want) for c in calls)  # every op once per call
    assert len({tuple(c) for c in calls}) == 24           # in a random order: all 24 orders occur
    for op, (lo, hi) in want.items():
        f = np.array(seen[op])
        assert lo - 1e-9 <= f.min() and f.max() <= hi + 1e-9, op
        # uniform over the whole range: the extremes are reached (expected gap (hi - lo) / n) and the
        # CDF is the uniform one (KS critical value at alpha = 0.001: 1.95 / sqrt(3000) = 0.036)
        assert f.min() - lo < 0.005 * (hi - lo) and hi - f.max() < 0.005 * (hi - lo), op
        grid = np.sort(f)
        assert np.abs(np.arange(1, n + 1) / n - (grid - lo) / (hi - lo)).max() < 0.036, op


def test_probabilities_over_many_draws():
    t = simclr_transform(32, color_dist_s=1.0)
    flip, color = t.transforms[1], T.Compose(t.transforms[2:4])  # colour: jitter (p 0.8), then grayscale (p 0.2)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    arr = np.asarray(img)
    torch.manual_seed(0)
    n = 2000
    flips = sum(np.array_equal(np.asarray(flip(img)), arr[:, ::-1]) for _ in range(n)) / n
    gray = unchanged = 0
    for _ in range(n):
        out = np.asarray(color(img)).astype(int)
        if np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2]):
            gray += 1
        elif np.array_equal(out, arr):
            unchanged += 1
    # 3-sigma bounds for n = 2000
    assert abs(flips - 0.5) < 0.034
    assert abs(gray / n - 0.2) < 0.027
    assert abs(unchanged / n - 0.2 * 0.8) < 0.025    # neither jitter (p=0.8) nor grayscale (p=0.2)


def test_blur_only_for_large_images_with_p_half():
    small = simclr_transform(32)
    assert not any(isinstance(op, T.RandomApply) and isinstance(op.transforms[0], T.GaussianBlur)
                   for op in small.transforms)
    large = simclr_transform(224)
    blur_op = [op for op in large.transforms
               if isinstance(op, T.RandomApply) and isinstance(op.transforms[0], T.GaussianBlur)][0]
    blur = blur_op.transforms[0]
    assert blur_op.p == 0.5 and blur.kernel_size == (23, 23) and blur.sigma == (0.1, 2.0)
    assert blur_kernel_size(224) == 23 and blur_kernel_size(96) == 11
    x = torch.rand(3, 64, 64)
    torch.manual_seed(0)
    rate = sum(not torch.equal(blur_op(x), x) for _ in range(1000)) / 1000
    assert abs(rate - 0.5) < 0.05


def test_output_range_and_views_independent_but_reproducible():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))

    class OneImage:
        targets = [0]

        def load(self, i):
            return image

        def __len__(self):
            return 1

    ds = MultiViewDataset(OneImage(), simclr_transform(32), multiplier=3)
    views, label = ds[(0, 1234)]
    assert views.shape == (3, 3, 32, 32) and label == 0
    assert views.min() >= 0 and views.max() <= 1
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    again, _ = ds[(0, 1234)]
    assert torch.equal(views, again)                     # a sample's views depend on its seed only
    before = torch.get_rng_state()
    ds[(0, 99)]
    assert torch.equal(before, torch.get_rng_state())    # the caller's RNG is untouched


def test_step_batches_world_size_independent():
    one = StepBatches(100, 20, seed=5)
    two = [StepBatches(100, 20, seed=5, rank=r, world=2) for r in range(2)]
    for step in (0, 3, 7, 12):
        assert one.indices(step) == two[0].indices(step) + two[1].indices(step)
    epoch0 = sum((one.indices(s) for s in range(5)), [])
    assert sorted(epoch0) == list(range(100))            # an epoch visits every image once
    assert one.indices(5) != one.indices(0)              # and the next epoch reshuffles


def test_subset_of_subset_keeps_the_array_and_the_images():
    import numpy as np
    from simclr.data.datasets import ArrayImages

    arr = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    base = ArrayImages(arr, list(range(10)), [str(i) for i in range(10)], "toy", 2)
    inner = base.subset([1, 3, 5, 7, 9]).subset([0, 2, 4])      # -> base images 1, 5, 9
    assert inner.targets == [1, 5, 9]
    assert np.array_equal(inner.images, arr[[1, 5, 9]])
    assert np.array_equal(np.asarray(inner.load(1)), arr[5])
