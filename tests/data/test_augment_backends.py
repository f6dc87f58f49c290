"""simclr.data.augment: each op's batched backend against its own reference backend (torchvision on one image).

Each op runs alone, both ways, on the same 1,000 real CIFAR-10 images; the distributions of what it changes
(luma, colourfulness, sharpness, how often an image comes out flipped or gray) must agree. A new op in
augment.py without a row here fails ``test_every_op_is_checked_against_its_reference``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from simclr.data import augment, get_dataset, maybe_subset
from simclr.data.augment import AugSpec, BatchAugment, reference_transform

SIZE = 32
OPS = {
    "ResizedCrop": lambda: augment.ResizedCrop(SIZE, 0.08),
    "Flip": lambda: augment.Flip(),
    "ColorJitter": lambda: augment.ColorJitter(1.0),
    "Grayscale": lambda: augment.Grayscale(),
    "Blur": lambda: augment.Blur(SIZE, True, (0.1, 2.0)),
    "PadCrop": lambda: augment.PadCrop(SIZE),
}


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.union1d(a, b)
    ca = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(ca - cb).max())


@pytest.fixture(scope="module")
def images(data_root) -> torch.Tensor:
    ds = maybe_subset(get_dataset("cifar10", "train"), 1000, seed=3)
    return torch.from_numpy(ds.images).permute(0, 3, 1, 2).float() / 255


def _stats(v: torch.Tensor, x: torch.Tensor) -> dict:
    """What the ops change, per view (v: views of the images x, same order)."""
    lum = 0.2989 * v[:, 0] + 0.587 * v[:, 1] + 0.114 * v[:, 2]
    same = (v - x).abs().flatten(1).mean(1)
    mirrored = (v - x.flip(-1)).abs().flatten(1).mean(1)
    return {"luma": lum.mean((1, 2)).numpy(),
            "colour": (v.amax(1) - v.amin(1)).mean((1, 2)).numpy(),
            "sharpness": (v[..., 1:] - v[..., :-1]).abs().mean((1, 2, 3)).numpy(),
            "flipped": float((mirrored < same).float().mean()),
            "gray": float(((v.amax(1) - v.amin(1)).amax((1, 2)) < 1e-6).float().mean())}


def _both(op, x: torch.Tensor) -> tuple:
    ref_tf = reference_transform([op])
    torch.manual_seed(0)
    ref = torch.stack([ref_tf(Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy())) for img in x])
    n = x.shape[0]
    sides = torch.full((n,), float(SIZE))
    p = augment.draw([op], sides, sides, torch.Generator().manual_seed(1))
    fast = op.resample(x, p, torch.arange(n)) if hasattr(op, "resample") else op.batch(x.clone(), p)
    return ref, fast.clamp(0, 1)


@pytest.mark.parametrize("name", sorted(OPS))
def test_each_ops_batched_backend_follows_its_reference(images, name):
    ref, fast = _both(OPS[name](), images)
    a, b = _stats(ref, images), _stats(fast, images)
    for key in ("luma", "colour", "sharpness"):
        assert _ks(a[key], b[key]) < 0.1, (name, key, _ks(a[key], b[key]))
    for key in ("flipped", "gray"):  # rates: standard error <= 0.016 at 1,000 views
        assert abs(a[key] - b[key]) < 0.06, (name, key, a[key], b[key])


def test_the_ops_change_what_the_statistics_look_at(images):
    """The comparison above has teeth: each op moves its statistic away from the untouched images."""
    untouched = _stats(images, images)
    _, flip = _both(OPS["Flip"](), images)
    _, gray = _both(OPS["Grayscale"](), images)
    _, blur = _both(OPS["Blur"](), images)
    _, jitter = _both(OPS["ColorJitter"](), images)
    assert untouched["flipped"] < 0.05 and 0.4 < _stats(flip, images)["flipped"] < 0.6
    assert untouched["gray"] < 0.05 and 0.15 < _stats(gray, images)["gray"] < 0.25
    assert _ks(untouched["sharpness"], _stats(blur, images)["sharpness"]) > 0.2
    assert _ks(untouched["luma"], _stats(jitter, images)["luma"]) > 0.15  # the tolerance above is 0.1


def test_pad_crop_equals_torchvision_pad_and_crop_at_the_drawn_offsets(images):
    op = augment.PadCrop(SIZE)
    x = images[:64]
    sides = torch.full((64,), float(SIZE))
    p = augment.draw([op], sides, sides, torch.Generator().manual_seed(2))
    out = op.batch(x, p)
    for k in range(64):
        padded = TF.pad(x[k], [op.pad] * 4, padding_mode="reflect")
        want = TF.crop(padded, int(p.top[k]), int(p.left[k]), SIZE, SIZE)
        assert torch.equal(out[k], want), k
    # offsets uniform over 0 .. 2 * pad, as torchvision's RandomCrop draws them
    big = augment.draw([op], torch.full((9000,), 32.0), torch.full((9000,), 32.0), torch.Generator().manual_seed(3))
    counts = torch.bincount(big.top, minlength=2 * op.pad + 1).float() / 9000
    assert counts.shape[0] == 2 * op.pad + 1 and (counts - 1 / (2 * op.pad + 1)).abs().max() < 0.03


def test_every_op_is_checked_against_its_reference():
    declared = {cls.__name__ for cls in augment.Op.__subclasses__() if cls.__module__ == augment.__name__}
    assert declared == set(OPS), f"ops without a reference check here: {declared - set(OPS)}"
    # and the SimCLR recipe is made of them, in the order the paper applies them
    assert [type(op).__name__ for op in AugSpec(SIZE).ops()] == ["ResizedCrop", "Flip", "ColorJitter", "Grayscale",
                                                                  "Blur"]


def test_one_spec_builds_every_consumer_with_the_runs_blur_sigma():
    """--blur_sigma reaches both backends and the report's caption from the config alone (the report's views
    once dropped it)."""
    cfg = {"color_dist_s": 0.5, "scale_lower": 0.2, "blur": "on", "blur_sigma": "0.2,2.0"}
    spec = AugSpec.from_config(cfg, 96)
    ref_blur = [t for t in spec.reference().transforms if "GaussianBlur" in repr(t)]
    assert len(ref_blur) == 1 and ref_blur[0].transforms[0].sigma == (0.2, 2.0)
    p = BatchAugment(spec).params(torch.full((4000,), 96.0), torch.full((4000,), 96.0),
                                  torch.Generator().manual_seed(0))
    assert 0.2 <= float(p.sigma.min()) < 0.21 and 1.99 < float(p.sigma.max()) <= 2.0
    assert "scale 0.2-1" in spec.describe() and "s=0.5" in spec.describe() and "sigma 0.2-2" in spec.describe()


def test_extending_example_op_has_two_backends_that_agree(images):
    """docs/extending.md's Solarize, as the page shows it: both backends solarize about 20% of the views, and a
    solarized view is exactly 1 - x above 0.5 and x below."""
    import re
    from pathlib import Path
    page = (Path(__file__).resolve().parents[2] / "docs" / "extending.md").read_text()
    (code,) = re.findall(r"<!-- tested: tests/data/test_augment_backends.py -->\n```python\n(.*?)```", page, re.S)
    scope: dict = {"__name__": "extending_example"}
    exec(compile(code, "docs/extending.md", "exec"), scope)
    op = scope["Solarize"]()
    x = images
    solarized = torch.where(x >= 0.5, 1 - x, x)
    ref, fast = _both(op, x)
    for views in (ref, fast):
        hit = (views - solarized).abs().flatten(1).amax(1) < 5e-3  # the reference rounds through uint8
        miss = (views - x).abs().flatten(1).amax(1) < 5e-3
        assert bool((hit | miss).all()) and 0.16 < float(hit.float().mean()) < 0.24


@pytest.mark.parametrize("loader", ["fast", "reference"])
def test_extending_example_op_in_the_recipe_trains_two_steps(tmp_path, data_root, monkeypatch, loader):
    """The same Solarize appended to the recipe (AugSpec.ops, the one place an op joins it): a 2-step
    `simclr pretrain` applies it through the input pipeline asked for, the batched backend on every step's views or
    the reference transform on every image of the reference loader."""
    import re
    from pathlib import Path

    from tests.conftest import run_cli, tiny_args
    page = (Path(__file__).resolve().parents[2] / "docs" / "extending.md").read_text()
    (code,) = re.findall(r"<!-- tested: tests/data/test_augment_backends.py -->\n```python\n(.*?)```", page, re.S)
    scope: dict = {"__name__": "extending_example"}
    exec(compile(code, "docs/extending.md", "exec"), scope)
    calls = {"batch": 0, "reference": 0}

    class Counted(scope["Solarize"]):
        def batch(self, x, p):
            calls["batch"] += x.shape[0]
            return super().batch(x, p)

        def reference(self):
            inner = super().reference()

            def apply(x):
                calls["reference"] += 1
                return inner(x)
            return apply
    ops = AugSpec.ops
    monkeypatch.setattr(AugSpec, "ops", lambda self: [*ops(self), Counted()])
    r = run_cli("pretrain", *tiny_args(tmp_path, iters=2, batch_size=16, loader=loader))
    assert r.returncode == 0, r.stderr[-3000:]
    assert calls["batch" if loader == "fast" else "reference"] == 2 * 16 * 2  # 2 steps x 16 images x 2 views
