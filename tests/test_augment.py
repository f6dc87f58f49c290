"""The reference augmentations: the paper's parameters and probabilities, measured over many draws."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from simclr.data.loaders import MultiViewDataset
from simclr.data.sampler import StepBatches
from simclr.data.transforms import blur_kernel_size, simclr_transform


def coord_image(side=200):
    """R encodes x, G encodes y (0..255), B = 128: a crop's corners reveal its box."""
    y, x = np.mgrid[0:side, 0:side]
    arr = np.stack([x * 255 // (side - 1), y * 255 // (side - 1), np.full_like(x, 128)], -1).astype(np.uint8)
    return Image.fromarray(arr)


def test_crop_area_and_aspect_ratio_within_bounds():
    t = simclr_transform(32, color_dist_s=1.0, scale_lower=0.08)
    crop = t.transforms[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.interpolation == InterpolationMode.BICUBIC
    img = coord_image(200)
    torch.manual_seed(0)
    areas, ratios = [], []
    for _ in range(400):
        i, j, h, w = T.RandomResizedCrop.get_params(img, crop.scale, crop.ratio)
        areas.append(h * w / 200 ** 2)
        ratios.append(w / h)
        # the op itself crops exactly that box: corner pixels encode the box's corners
    torch.manual_seed(1)
    out = np.asarray(crop(img)).astype(float)
    assert out.shape == (32, 32, 3)
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


def test_jitter_parameters_follow_strength():
    s = 0.5
    t = simclr_transform(32, color_dist_s=s)
    color = t.transforms[2]
    apply_jitter, gray = color.transforms
    assert isinstance(apply_jitter, T.RandomApply) and apply_jitter.p == 0.8
    jitter = apply_jitter.transforms[0]
    assert jitter.brightness == pytest.approx((1 - 0.8 * s, 1 + 0.8 * s))
    assert jitter.contrast == pytest.approx((1 - 0.8 * s, 1 + 0.8 * s))
    assert jitter.saturation == pytest.approx((1 - 0.8 * s, 1 + 0.8 * s))
    assert jitter.hue == pytest.approx((-0.2 * s, 0.2 * s))
    assert isinstance(gray, T.RandomGrayscale) and gray.p == 0.2
    # the factors drawn stay within those bounds
    torch.manual_seed(0)
    for _ in range(200):
        _, b, c, sat, h = T.ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        assert 0.6 <= b <= 1.4 and 0.6 <= c <= 1.4 and 0.6 <= sat <= 1.4 and -0.1 <= h <= 0.1


def test_probabilities_over_many_draws():
    t = simclr_transform(32, color_dist_s=1.0)
    flip, color = t.transforms[1], t.transforms[2]
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
    blur_op = [op for op in large.transforms if isinstance(op, T.RandomApply)][0]
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
