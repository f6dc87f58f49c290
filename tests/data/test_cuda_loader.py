"""The input paths a first ImageNet / folder run on a GPU depends on, checked on the CPU: a fixed number of
shared-memory descriptors per worker batch, a loud (once) fallback when batched JPEG decoding fails, batched
crops of same-size images, and a reference batch that stays pinned until it is copied."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from simclr import config as config_lib
from simclr.data import batch_aug, fast, get_dataset, loaders
from simclr.data.augment import AugSpec, BatchAugment, apply
from simclr.data.batch_aug import resized_crops
from simclr.data.images import open_rgb
from simclr.options import PretrainConfig

from tests.conftest import REPO


def _folder(root, n_per_class: int, size=(24, 24), seed=0):
    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        for k in range(n_per_class):
            h, w = size
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / "train" / cls / f"{k:03d}.jpg", quality=90)
    return root


def _cfg(root, **over):
    base = dict(data="folder", data_path=str(root), image_size=16, batch_size=8, seed=0, workers=0, loader="fast",
                device="cpu")
    base.update(over)
    return config_lib.build(PretrainConfig, base)


def test_a_worker_batch_is_four_tensors_and_splits_back_into_its_items():
    items = [(torch.arange(7, dtype=torch.uint8), 4), (torch.randint(0, 255, (3, 5, 6), dtype=torch.uint8), 9),
             (torch.arange(3, dtype=torch.uint8) + 100, 1)]
    batch = fast._collate(items)
    assert len(batch) == 4 and all(isinstance(t, torch.Tensor) for t in batch)
    data, offsets, shapes, idx = batch
    assert data.dtype == torch.uint8 and data.dim() == 1 and data.numel() == 7 + 90 + 3
    assert offsets.tolist() == [0, 7, 97, 100] and idx.tolist() == [4, 9, 1]
    back = fast.split_items(data, offsets, shapes)
    assert len(back) == 3
    for (want, _), got in zip(items, back):
        assert got.shape == want.shape and torch.equal(got, want)


CHILD = textwrap.dedent("""
    import resource, sys
    import torch
    from simclr import config as config_lib
    from simclr.data import get_dataset
    from simclr.data.fast import FastLoader
    from simclr.options import PretrainConfig
    root = sys.argv[1]
    cfg = config_lib.build(PretrainConfig, dict(data="folder", data_path=root, image_size=16, batch_size=48, seed=0,
                                                workers=2, loader="fast", device="cpu"))
    ds = get_dataset("folder", "pretrain", root, 16)
    loader = FastLoader(cfg, ds, torch.device("cpu"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))  # the workers are forked after this: they inherit it
    n = 0
    for x, y in loader.batches(0, 6):
        assert x.shape == (96, 3, 16, 16) and y.shape == (48,)
        n += 1
    print("batches", n)
""")


def test_file_batches_through_two_workers_fit_in_64_file_descriptors(tmp_path):
    """A real DataLoader with 2 workers (prefetch 4 each) over 48-image batches, the process limited to 64
    open files. With one shared-memory descriptor per image this ran out of descriptors (Errno 24 in the
    workers' descriptor server) and then hung, waiting for batches that never came: hence the time limit."""
    root = _folder(tmp_path / "imgs", 48)
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True, timeout=150,
                           env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                "SIMCLR_CACHE": str(tmp_path / "cache")})
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"the loader hung under a 64-descriptor limit; its stderr ends:\n{err[-2000:]}")
    assert r.returncode == 0 and "batches 6" in r.stdout, r.stderr[-3000:]


def test_a_failing_batched_jpeg_decode_warns_once_and_still_decodes(tmp_path, monkeypatch):
    import torchvision.io

    root = _folder(tmp_path / "imgs", 4)

    def broken(*a, **k):
        raise RuntimeError("nvjpeg is not available in this build")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", broken)
    monkeypatch.setattr(fast, "_fallback_warned", False)
    ds = get_dataset("folder", "pretrain", str(root), 16)
    loader = fast.FastLoader(_cfg(root, batch_size=4, aug=False), ds, torch.device("cpu"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # the registry would hide a repeat: "once" must be the code's doing
        out = list(loader.batches(0, 3))
    ours = [w for w in seen if "batched JPEG decoding" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    msg = str(ours[0].message)
    assert "nvjpeg is not available in this build" in msg and "PIL" in msg and "seconds per step" in msg
    # the fallback decoded the right images (stored at 24 px; --aug false resizes to 16: compare step 0 at 24)
    items = [torch.from_numpy(np.fromfile(ds.files[i], dtype=np.uint8)) for i in loader.steps.indices(0)]
    dec = fast.decode_batch(items, torch.device("cpu"))
    for i, t in zip(loader.steps.indices(0), dec):
        assert torch.equal(t, torch.from_numpy(np.array(open_rgb(ds.files[i]))).permute(2, 0, 1))
    assert len(out) == 3 and out[0][0].shape == (8, 3, 16, 16)


def test_from_list_crops_same_size_images_together_and_matches_one_call_per_image(monkeypatch):
    g = torch.Generator()
    sizes = [(20, 30), (24, 24), (20, 30), (24, 24), (31, 17), (20, 30)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    aug = BatchAugment(AugSpec(16, blur="on"), multiplier=2)
    calls = []

    def counting(src, *a, **k):
        calls.append(src.shape[0])
        return resized_crops(src, *a, **k)

    monkeypatch.setattr(batch_aug, "resized_crops", counting)
    got = aug.from_list(images, torch.Generator().manual_seed(5))
    assert sorted(calls) == [1, 2, 3]  # one call per distinct size

    # independent reference: the same parameters, one resampling call per image (the old loop)
    b, m = len(images), 2
    hs = torch.tensor([float(h) for h, _ in sizes]).repeat(m)
    ws = torch.tensor([float(w) for _, w in sizes]).repeat(m)
    p = aug.params(hs, ws, torch.Generator().manual_seed(5))
    ref = torch.empty(m * b, 3, 16, 16)
    for k, img in enumerate(images):
        rows = torch.arange(k, m * b, b)
        ref[rows] = resized_crops(img.float().div(255).unsqueeze(0), p.boxes[rows], torch.zeros(m, dtype=torch.long),
                                  16, "auto")
    ref = apply(aug.rest, ref, p)
    assert got.shape == (12, 3, 16, 16)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_the_reference_batch_that_is_pinned_is_the_one_copied(monkeypatch, data_root):
    """Pinning needs a CUDA driver; here the DataLoader's pin function is replaced by one that records what it
    pinned. The tensor the loader yields must be that pinned tensor (same memory), not a reshaped copy."""
    pinned: set = set()

    def fake_pin(data, device=None):
        for t in data:
            pinned.add(t.data_ptr())
        return data

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: None)
    monkeypatch.setattr(torch.utils.data._utils.pin_memory, "pin_memory", fake_pin)
    images = get_dataset("cifar10", "pretrain").subset(range(32))
    from simclr.data.transforms import eval_transform
    ref = loaders.ReferenceLoader(images, eval_transform(32, 32), 2, 8, seed=0, workers=0, pin_memory=True)
    for x, y in ref.batches(0, 2):
        assert x.data_ptr() in pinned and y.data_ptr() in pinned
        assert x.shape == (16, 3, 32, 32) and x.is_contiguous()
        # views first: rows k and 8 + k are two views of the same image (no augmentation: equal)
        assert torch.equal(x[:8], x[8:])
    assert len(pinned) == 4
    # without the request nothing is pinned (the default on a CPU device)
    pinned.clear()
    next(loaders.ReferenceLoader(images, eval_transform(32, 32), 2, 8, seed=0, workers=0).batches(0, 1))
    assert not pinned


@pytest.mark.parametrize("workers", [0, 2])
def test_file_batches_are_the_same_with_and_without_workers(tmp_path, workers):
    root = _folder(tmp_path / "imgs", 8, size=(20, 28))
    ds = get_dataset("folder", "pretrain", str(root), 16)
    x0, y0 = next(fast.FastLoader(_cfg(root, workers=0), ds, torch.device("cpu")).batches(1, 2))
    x, y = next(fast.FastLoader(_cfg(root, workers=workers), ds, torch.device("cpu")).batches(1, 2))
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert torch.equal(y, torch.as_tensor([ds.targets[i] for i in
                                           fast.FastLoader(_cfg(root), ds, torch.device("cpu")).steps.indices(1)]))
