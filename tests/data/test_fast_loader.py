"""FastLoader: batches are a function of (seed, step, rank); same images as the reference loader;
file datasets decode through torchvision.io; resume on the fast path is exact."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr import config as config_lib
from simclr.options import PretrainConfig
from simclr.data import get_dataset, maybe_subset
from simclr.data.fast import FastLoader, decode_batch
from simclr.data.loaders import build_loader
from simclr.errors import DataError

from tests.conftest import tiny_args


def _cfg(**over):
    base = dict(data="cifar10", batch_size=16, seed=3, workers=0, loader="fast", device="cpu")
    base.update(over)
    return config_lib.build(PretrainConfig, base)


@pytest.fixture(scope="module")
def cifar(data_root):
    return maybe_subset(get_dataset("cifar10", "pretrain"), 64, seed=0)


def test_same_seed_and_step_give_the_same_batch(cifar):
    a = FastLoader(_cfg(), cifar, torch.device("cpu"))
    b = FastLoader(_cfg(), cifar, torch.device("cpu"))
    run = list(a.batches(0, 6))  # crosses an epoch boundary (4 steps per epoch)
    x5, y5 = next(b.batches(5, 6))  # a fresh loader started at step 5, as after a resume
    assert torch.equal(run[5][0], x5) and torch.equal(run[5][1], y5)
    assert run[0][0].shape == (32, 3, 32, 32) and run[0][0].dtype == torch.float32
    assert not torch.equal(run[0][0], run[1][0])
    other = next(FastLoader(_cfg(seed=4), cifar, torch.device("cpu")).batches(5, 6))[0]
    assert not torch.equal(other, x5)


def test_fast_and_reference_loaders_draw_the_same_images(cifar):
    fast = build_loader(_cfg(aug=False), cifar, torch.device("cpu"))
    ref = build_loader(_cfg(aug=False, loader="reference"), cifar, torch.device("cpu"))
    assert isinstance(fast, FastLoader) and fast.steps_per_epoch == ref.steps_per_epoch == 4
    for (xf, yf), (xr, yr) in zip(fast.batches(2, 7), ref.batches(2, 7)):
        assert torch.equal(yf, yr)
        assert torch.equal(xf, xr)  # no augmentation: both are the stored pixels / 255, views stacked alike


def test_views_are_ordered_view_major(cifar):
    x, _ = next(FastLoader(_cfg(aug=False, multiplier=3), cifar, torch.device("cpu")).batches(0, 1))
    assert x.shape == (48, 3, 32, 32) and torch.equal(x[:16], x[16:32]) and torch.equal(x[:16], x[32:])


def test_rank_slices_partition_the_global_batch(cifar):
    full = next(FastLoader(_cfg(aug=False), cifar, torch.device("cpu")).batches(1, 2))[1]
    parts = [next(FastLoader(_cfg(aug=False), cifar, torch.device("cpu"), rank=r, world=2).batches(1, 2))[1]
             for r in range(2)]
    assert torch.equal(torch.cat(parts), full)


def test_file_dataset_decodes_with_torchvision_io_and_augments_at_224(data_root):
    ds = maybe_subset(get_dataset("folder", "pretrain", str(data_root / "imagenette-mini")), 20, seed=0)
    loader = FastLoader(_cfg(data="folder", data_path=str(data_root / "imagenette-mini"), batch_size=4), ds,
                        torch.device("cpu"))
    assert loader.augment.blur_kernel == 23
    x, y = next(loader.batches(0, 1))
    idx = loader.steps.indices(0)
    assert x.shape == (8, 3, 224, 224)
    assert torch.equal(y, torch.as_tensor([ds.targets[i] for i in idx]))
    again, _ = next(loader.batches(0, 1))
    assert torch.equal(x, again)
    # without augmentation the views are the images of those indices (stored at 224 px: no resize),
    # here read by PIL: the file path reads the right files in the right order
    plain, _ = next(FastLoader(_cfg(data="folder", data_path=str(data_root / "imagenette-mini"), batch_size=4,
                                    aug=False), ds, torch.device("cpu")).batches(0, 1))
    pil = torch.stack([torch.from_numpy(np.array(ds.load(i).convert("RGB"))).permute(2, 0, 1) for i in idx]) / 255
    assert (plain[:4] - pil).abs().mean() < 1 / 255 and torch.equal(plain[:4], plain[4:])
    # with augmentation every view is its own: the two views of an image differ, and differ from it
    assert 0 <= x.min() and x.max() <= 1
    assert ((x[:4] - x[4:]).abs().mean((1, 2, 3)) > 0.02).all()
    assert ((x[:4] - pil).abs().mean((1, 2, 3)) > 0.02).all() and ((x[4:] - pil).abs().mean((1, 2, 3)) > 0.02).all()
    # decoding equals PIL's (both libjpeg) up to rounding
    files = [ds.base.files[i] for i in ds.indices[:3]]
    items = [torch.from_numpy(np.fromfile(f, dtype=np.uint8)) for f in files]
    for f, t in zip(files, decode_batch(items, torch.device("cpu"))):
        with Image.open(f) as im:
            pil = torch.from_numpy(np.array(im.convert("RGB")))
        assert (t.permute(1, 2, 0).float() - pil.float()).abs().mean() < 1.0


def test_unreadable_image_is_a_clear_error_or_skipped(tmp_path, data_root):
    src = data_root / "imagenette-mini" / "train"
    for k, cls in enumerate(sorted(p.name for p in src.iterdir())[:2]):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for f in sorted((src / cls).iterdir())[:4]:
            shutil.copy(f, tmp_path / "train" / cls / f.name)
    bad = tmp_path / "train" / sorted(p.name for p in src.iterdir())[0] / "broken.jpg"
    whole = next((src / bad.parent.name).iterdir()).read_bytes()
    bad.write_bytes(whole[:whole.find(b"\xff\xda")])  # a valid header (PIL opens it), no image data
    ds = get_dataset("folder", "pretrain", str(tmp_path), image_size=64)
    cfg = _cfg(data="folder", data_path=str(tmp_path), batch_size=9, image_size=64)
    with pytest.raises(DataError, match="broken.jpg: cannot load this image") as fast_err:
        next(FastLoader(cfg, ds, torch.device("cpu")).batches(0, 1))
    with pytest.raises(DataError) as ref_err:  # the reference path reads it with the same decoder
        ds.load(ds.files.index(bad))
    assert str(ref_err.value).split(": ", 2)[1] in str(fast_err.value)
    ds = get_dataset("folder", "pretrain", str(tmp_path), image_size=64, skip_bad_images=True)
    x, _ = next(FastLoader(cfg, ds, torch.device("cpu")).batches(0, 1))
    assert x.shape == (18, 3, 64, 64) and ds.bad_images == [str(bad)]


def _cli(*args) -> None:
    """The CLI's own entry point, in this process (saves a Python start per run)."""
    from simclr.cli import main
    assert main(list(args)) == 0


def _weights(ck: Path) -> dict:
    return torch.load(ck, map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
def test_resume_on_the_fast_path_reproduces_the_uninterrupted_run(tmp_path):
    common = dict(loader="fast", iters=4, save_freq=0, test_subset=100)
    _cli("pretrain", *tiny_args(tmp_path / "a", **common))
    _cli("pretrain", *tiny_args(tmp_path / "b", stop_after=2, **common))
    (ck2,) = sorted((tmp_path / "b").glob("**/checkpoint-*2.pt"))
    _cli("pretrain", *tiny_args(tmp_path / "b", ckpt=str(ck2), **common))
    (ck4a,) = sorted((tmp_path / "a").glob("**/checkpoint-*4.pt"))
    (ck4b,) = sorted((tmp_path / "b").glob("**/checkpoint-*4.pt"))
    a, b, mid = _weights(ck4a), _weights(ck4b), _weights(ck2)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the steps after the resume did change the weights
    assert any(not torch.equal(a[k], mid[k]) for k in a if a[k].is_floating_point())


@pytest.mark.slow
def test_grad_cache_through_the_cli_trains(tmp_path):
    # one fixed batch (32 images, batch 32) without augmentation: the objective is deterministic, so
    # every change of the logged loss is the optimizer's doing; it must go down, clearly
    _cli("pretrain", *tiny_args(tmp_path, loader="fast", iters=5, grad_cache_chunks=2, train_subset=32,
                                test_subset=20, aug="false", warmup=0))
    (metrics,) = tmp_path.glob("**/metrics.jsonl")
    losses = [m["loss"] for m in map(json.loads, metrics.read_text().splitlines()) if "loss" in m]
    assert len(losses) == 5 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.03, losses  # measured: 2.347 -> 2.272; no update leaves it unchanged
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    (ck,) = sorted(tmp_path.glob("**/checkpoint-*5.pt"))
    assert all(torch.isfinite(v).all() for v in _weights(ck).values() if v.is_floating_point())
