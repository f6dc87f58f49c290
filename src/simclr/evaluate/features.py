"""Frozen features of a dataset: plain (batched, no augmentation), augmented copies, and a disk cache."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import read
from ..data.cache import bound_cache, cache_used
from ..data.datasets import LabeledImages
from ..errors import CheckpointError
from ..files import cache_write
from ..data.transforms import eval_transform

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ..eval_options import EvalConfig


class _EvalDataset(Dataset):
    def __init__(self, images: LabeledImages, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images.load(i)), self.images.targets[i]


def image_batches(images: LabeledImages, image_size: int, batch_size: int = 512, workers: int = 0,
                  device: torch.device = torch.device("cpu")):
    """Yield (x, y) over the dataset in order, x float (B, 3, S, S) in [0, 1] on ``device``.

    Small datasets held as arrays at the network's size skip PIL entirely.
    """
    arr = getattr(images, "images", None)
    if arr is not None and arr.shape[1] == image_size:
        y_all = torch.as_tensor(np.asarray(images.targets))
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(arr[i:i + batch_size])).to(device)
            yield x.permute(0, 3, 1, 2).float().div_(255), y_all[i:i + batch_size].to(device)
        return
    native = arr.shape[1] if arr is not None else -1
    loader = DataLoader(_EvalDataset(images, eval_transform(image_size, native)), batch_size=batch_size,
                        num_workers=workers, pin_memory=device.type == "cuda")
    for x, y in loader:
        yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device)


@torch.no_grad()
def extract_features(encode, images: LabeledImages, image_size: int, batch_size: int = 512, workers: int = 0,
                     device: torch.device = torch.device("cpu"), autocast_dtype=None,
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """encode: callable (B, 3, S, S) -> (B, d). Returns (features (N, d) fp32, labels (N,)) on ``device``."""
    from ..progress import Progress
    feats, labels = [], []
    with Progress((len(images) + batch_size - 1) // batch_size, "features", progress, leave=False) as bar:
        for x, y in image_batches(images, image_size, batch_size, workers, device):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                f = encode(x)
            feats.append(f.float())
            labels.append(y)
            bar.update(1)
    return torch.cat(feats), torch.cat(labels)


# --------------------------------------------------------------------------------------------
# train-time augmentation of the evaluation protocols, augmented copies, and the feature cache
# --------------------------------------------------------------------------------------------
def augment_transform(kind: str, image_size: int, native: int, scale_lower: float = 0.08):
    """The spec's linear-evaluation augmentation: PIL image -> (3, S, S) float in [0, 1].

    RandomCrop: pad 4 (reflect) and crop back, then horizontal flip (CIFAR). RandomResizedCrop:
    bicubic crop of area fraction [scale_lower, 1] resized to S, then flip (ImageNet). none: the
    test transform.
    """
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    from ..data.augment import linear_eval_ops, reference_transform
    if kind == "none":
        return eval_transform(image_size, native)
    ops = linear_eval_ops(kind, image_size, scale_lower)
    # RandomCrop pads and crops an image already at the network's size: a larger one is first fitted to it
    fit = [T.Resize(image_size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    return reference_transform(ops, fit if kind == "RandomCrop" and native != image_size else None)


class SeededAugmented(Dataset):
    """Item i of copy c: the transform applied under an RNG seeded by (seed, c, i), so that a
    copy is the same whatever the batch size or worker count (what makes caching it valid)."""

    def __init__(self, images: LabeledImages, transform, copy: int, seed: int):
        self.images, self.transform, self.copy, self.seed = images, transform, copy, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.copy) * 10_000_019 + i)
            x = self.transform(self.images.load(i))
        return x, self.images.targets[i]


@torch.no_grad()
def extract_augmented(encode, images: LabeledImages, transform, copies: int, seed: int, batch_size: int = 512,
                      workers: int = 0, device: torch.device = torch.device("cpu"), autocast_dtype=None,
                      progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of ``copies`` augmented copies: (copies, N, d) fp32 and labels (N,)."""
    from ..progress import Progress
    out, labels = [], None
    total = copies * ((len(images) + batch_size - 1) // batch_size)
    with Progress(total, "features (augmented)", progress, leave=False) as bar:
        for c in range(copies):
            loader = DataLoader(SeededAugmented(images, transform, c, seed), batch_size=batch_size,
                                num_workers=workers, pin_memory=device.type == "cuda")
            feats, ys = [], []
            for x, y in loader:
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    feats.append(encode(x.to(device, non_blocking=True)).float())
                ys.append(torch.as_tensor(y).to(device))
                bar.update(1)
            out.append(torch.cat(feats))
            labels = torch.cat(ys)
    return torch.stack(out), labels


def dataset_fingerprint(images: LabeledImages) -> str:
    """What identifies a dataset's content for the cache: name, size, labels, subset indices, files."""
    import hashlib
    h = hashlib.sha1()
    h.update(f"{images.name}|{len(images)}|{images.image_size}".encode())
    h.update(np.asarray(images.targets, dtype=np.int64).tobytes())
    idx = getattr(images, "indices", None)
    if idx is not None:
        h.update(np.asarray(idx, dtype=np.int64).tobytes())
    base = getattr(images, "base", images)
    # the files' content identity (paths below the split's root, sizes, bytes), never where they lie: a staged
    # copy of the same images at another path shares the cache entry; an image rewritten in place does not
    h.update(getattr(base, "fingerprint", "").encode())
    arr = getattr(images, "images", None)
    if arr is not None:  # cheap content sample of in-memory arrays
        h.update(np.ascontiguousarray(arr[:: max(1, len(arr) // 64)]).tobytes())
    return h.hexdigest()[:16]


class FeatureCache:
    """Features on disk under ``<cache_dir>/features/<key>.pt``, key = hash of (encoder hash, layer,
    dataset fingerprint, transform, copies, seed). ``enabled=False`` (or no encoder hash, e.g. a
    random encoder) computes every time."""

    def __init__(self, encoder_hash: str, enabled: bool = True):
        from ..data.cache import cache_dir, max_bytes
        if enabled:
            max_bytes()  # a bad SIMCLR_CACHE_MAX_GB fails before the work, not after it
        self.encoder_hash, self.enabled = encoder_hash, enabled and bool(encoder_hash)
        self.folder = cache_dir() / "features" if self.enabled else None
        self.hits = 0

    def key(self, **parts) -> str:
        import hashlib
        import json
        return hashlib.sha1(json.dumps({"encoder": self.encoder_hash, **parts}, sort_keys=True,
                                       default=str).encode()).hexdigest()[:24]

    def get(self, compute, **parts):
        if not self.enabled:
            return compute()
        path = self.folder / f"{self.key(**parts)}.pt"
        if path.exists():
            try:
                cached = read(path)
                f, y = cached["features"], cached["labels"]
                self.hits += 1
                cache_used(path)
                return f, y
            except (CheckpointError, KeyError):  # a truncated (or older-format) cache file: recompute it
                path.unlink(missing_ok=True)
            except FileNotFoundError:  # evicted by another process meanwhile
                pass
        f, y = compute()
        features, labels = f.cpu(), y.cpu()
        if cache_write(path, lambda fh: torch.save({"features": features, "labels": labels}, fh)):
            bound_cache(path)
        return f, y


# --------------------------------------------------------------------------------------------
# the features of an evaluation's splits, extracted once and cached on disk
# --------------------------------------------------------------------------------------------
TRAIN_AUG_SEED, TEST_AUG_SEED = 0, 1  # fixed, so augmented copies are cacheable across runs


def native_side(images) -> int:
    """The side of the images a dataset holds in memory, -1 for files (read at their own size)."""
    arr = getattr(images, "images", None)
    return arr.shape[1] if arr is not None else -1


class Features:
    """Plain or augmented-copies features of the train, test and unlabelled splits, as (features, labels) on
    the device; ``cfg.cache_features`` keeps them on disk keyed by the encoder file's hash and the data."""

    def __init__(self, cfg: EvalConfig, inp):  # inp: run.Inputs (run imports this)
        self.cfg, self.inp = cfg, inp
        self.cache = FeatureCache(inp.encoder_hash, cfg.cache_features)

    def encoder_changed(self) -> None:
        """After fine-tuning: the encoder's features are no longer the cached ones."""
        self.cache = FeatureCache("", False)

    def plain(self, images, split: str) -> tuple:
        cfg, inp = self.cfg, self.inp
        bs = cfg.precompute_emb_bs if cfg.precompute_emb_bs > 0 else cfg.test_bs

        def compute():
            log.info(f"extracting features: {split} ({len(images)} images, layer {inp.layer})")
            return extract_features(inp.encode, images, inp.image_size, bs, cfg.workers, inp.device, inp.amp,
                                    progress=cfg.verbose)

        f, y = self.cache.get(compute, kind="plain", data=dataset_fingerprint(images), layer=inp.layer,
                              size=inp.image_size, **inp.compute)
        return f.to(inp.device), y.to(inp.device)

    def augmented(self, images, split: str, copies: int, seed: int) -> tuple:
        cfg, inp = self.cfg, self.inp
        transform = augment_transform(inp.aug, inp.image_size, native_side(images), cfg.scale_lower)

        def compute():
            log.info(f"extracting features: {copies} augmented copies of {split} ({len(images)} images, "
                     f"{inp.aug})")
            return extract_augmented(inp.encode, images, transform, copies, seed, cfg.test_bs, cfg.workers,
                                     inp.device, inp.amp, progress=cfg.verbose)

        f, y = self.cache.get(compute, kind="augmented", aug=inp.aug, scale_lower=cfg.scale_lower,
                              copies=copies, seed=seed, data=dataset_fingerprint(images), layer=inp.layer,
                              size=inp.image_size, **inp.compute)
        return f.to(inp.device), y.to(inp.device)

    def _of(self, images, split: str, copies: int, seed: int) -> tuple:
        if self.inp.aug != "none" and copies > 0:
            return self.augmented(images, split, copies, seed)
        return self.plain(images, split)

    def train(self) -> tuple:
        return self._of(self.inp.train, "train", self.cfg.n_augs_train, TRAIN_AUG_SEED)

    def test(self) -> tuple:
        return self._of(self.inp.test, "test", self.cfg.n_augs_test, TEST_AUG_SEED)

    def unlabeled(self) -> Optional[tuple]:
        """The spec tests the unlabelled rest like the test split (averaged copies when n_augs_test is set)."""
        if self.inp.unlabeled is None:
            return None
        return self._of(self.inp.unlabeled, "unlabelled rest of train", self.cfg.n_augs_test, TEST_AUG_SEED)
