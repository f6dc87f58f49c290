"""Datasets: where images come from, with one small interface for all of them.

Every dataset is a :class:`LabeledImages`: ``len()``, ``load(i) -> PIL.Image`` (RGB),
``targets`` (list of int labels, -1 for unlabeled), ``classes`` and ``image_size``
(the side the network sees). Small datasets (CIFAR-10/100, STL-10) are held as one
uint8 array (N, H, W, 3) in memory — decoded once and cached on disk — so workers and
the GPU path can index them cheaply; large ones (ImageNet, any folder) are read from
files on demand.

Roots: ``DATA_ROOT`` (CIFAR, STL-10; default: :func:`data_root`), ``IMAGENET_PATH`` (a folder with
train/ and val/, as in the spec), ``--data_path`` for ``--data folder``. Decoded arrays
are cached under ``SIMCLR_CACHE`` (default ~/.cache/simclr), never inside the data root,
which may be read-only.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from ..errors import DataError
from ..files import cache_write
from ..names import DATASETS
from ..progress import ALWAYS
from .cache import bound_cache, cache_dir, cache_used, max_bytes
from .identity import files_identity
from .scan import (HEADER_CHECK_MAX, IMG_EXTENSIONS, PathList, _bad_image_error, bad_image_fix, check_headers,
                   listed, once, scan_folder)
from .images import DECODER, open_rgb

log = logging.getLogger(__name__)

NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "imagenet": 224, "folder": 224}


def _clone_root() -> Optional[Path]:
    """The clone this package runs from (``src/simclr/data/`` three levels down), None for an installed copy."""
    repo = Path(__file__).resolve().parents[3]
    return repo if (repo / "pyproject.toml").is_file() and (repo / "src" / "simclr").is_dir() else None


def data_root() -> Path:
    """Where CIFAR and STL-10 are read, one rule for every command (the Makefile's too):
    ``$DATA_ROOT`` when set; else ``./data`` when it holds anything; else ``../shared/data`` next to the
    clone this package runs from, when that folder exists; else ``./data`` (where a download would go)."""
    if os.environ.get("DATA_ROOT"):
        return Path(os.environ["DATA_ROOT"])
    local = Path("data")
    if local.is_dir() and any(local.iterdir()):
        return local
    clone = _clone_root()
    if clone is not None and (clone.parent / "shared" / "data").is_dir():
        return clone.parent / "shared" / "data"
    return local


def _created_dirs(path: Path) -> list:
    """The folders from ``path`` up that do not exist yet (what a download would create), deepest first."""
    out = []
    path = Path(os.path.abspath(path))
    while not path.exists():
        out.append(path)
        path = path.parent
    return out


def _remove_empty(dirs: list) -> None:
    """Undo the folders a failed download left behind, as long as they are still empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


class LabeledImages:
    """Interface: ``len``, ``load(i) -> PIL RGB image``, ``targets``, ``classes``, ``image_size``, ``name``."""

    name: str = ""
    fingerprint: str = ""  # files_identity of the files the split was read from (image folder or binary batches)
    listing: str = ""
    classes: list
    targets: list
    image_size: int

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, i: int) -> Image.Image:  # pragma: no cover - interface
        raise NotImplementedError

    def subset(self, indices: Sequence[int]) -> "LabeledImages":
        return Subset(self, list(indices))


class ArrayImages(LabeledImages):
    """Images held as one uint8 array (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: list, name: str, image_size: int):
        self.images, self.targets, self.classes, self.name = images, list(targets), classes, name
        self.image_size = image_size

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])


class FileImages(LabeledImages):
    """Images read from files on demand (ImageNet, any image folder)."""

    def __init__(self, files: list, targets: Sequence[int], classes: list, name: str, image_size: int,
                 skip_bad_images: Optional[bool] = None):
        self.files, self.targets, self.classes, self.name = PathList(files), list(targets), classes, name
        self.image_size = image_size
        self.skip_bad_images = skip_bad_images
        self.bad_images: list = []

    def load(self, i: int) -> Image.Image:
        for j in range(len(self.files)):  # with skip_bad_images, fall through to the next readable file
            k = (i + j) % len(self.files)
            try:
                return open_rgb(self.files[k])
            except Exception as e:  # PIL raises many types for broken files
                if not self.skip_bad_images:
                    raise DataError(f"cannot read image {self.files[k]}: {e}. "
                                    f"{bad_image_fix(self.skip_bad_images)}") from None
                self.bad_images.append(str(self.files[k]))
        raise DataError("no readable image in the dataset")


class Subset(LabeledImages):
    def __init__(self, base: LabeledImages, indices: list):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)  # no int object per image (forked workers)
        self.targets = [base.targets[i] for i in indices]
        self.classes, self.name, self.image_size = base.classes, base.name, base.image_size
        arr = getattr(base, "images", None)
        if arr is not None:  # keep the array (also for a subset of a subset) for the tensor paths
            self.images = arr[np.asarray(indices, dtype=np.int64)]

    def load(self, i: int) -> Image.Image:
        return self.base.load(int(self.indices[i]))


def _decode(path) -> np.ndarray:
    return np.asarray(open_rgb(path), dtype=np.uint8)


def _try_decode(path):
    """(array, "") or (None, reason): PIL raises many exception types for broken files."""
    try:
        return _decode(path), ""
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


class FolderArray(NamedTuple):
    images: np.ndarray
    targets: list
    classes: list
    bad: list          # unreadable files skipped
    fingerprint: str   # files_identity of the folder's images (content): the cache key ...
    listing: str       # ... and their names and sizes only


def folder_to_array(root: Path, name: str, skip_bad_images: Optional[bool] = None) -> FolderArray:
    """Decode a folder of same-size images into one uint8 array, cached on disk by the folder's content (a staged
    copy of the same images at another path shares the entry). Read once per :func:`~.scan.one_scan` block."""
    return once(("array", os.path.abspath(root), name, skip_bad_images),
                lambda: _folder_to_array(root, name, skip_bad_images))


def _folder_to_array(root: Path, name: str, skip_bad_images: Optional[bool]) -> FolderArray:
    max_bytes()  # a bad SIMCLR_CACHE_MAX_GB fails before the work, not after it
    t = time.perf_counter()
    files, targets, classes, special = scan_folder(root)
    key, listing = files_identity(files, root)
    listed(root, len(files), time.perf_counter() - t, "listed and identified")
    cached = cache_dir() / f"{name}-d{DECODER}-{key}.npz"
    if cached.exists():
        try:
            with np.load(cached) as z:
                got = FolderArray(z["images"], list(z["targets"]), classes, special, key, listing)
            cache_used(cached)
            return got
        except Exception:
            cached.unlink(missing_ok=True)  # corrupt cache: rebuild
    if len(files) >= 5000:  # a minute or more: say so before, once per folder (the array is cached)
        log.info(f"decoding {len(files)} images of {root} once (cached as {cached})", extra=ALWAYS)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as ex:
        decoded = list(ex.map(_try_decode, files, chunksize=256))
    bad = [(f, why) for f, (a, why) in zip(files, decoded) if a is None]
    if bad and not skip_bad_images:
        raise _bad_image_error(bad[0][0], bad[0][1], len(bad), skip_bad_images)
    bad += [(f, "not a regular file") for f in special]
    arrays = [a for a, _ in decoded if a is not None]
    targets = [t for t, (a, _) in zip(targets, decoded) if a is not None]
    if not arrays:
        raise DataError(f"no readable image in {root}")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"images in {root} differ in size ({sorted(shapes)[:3]} ...); use --data folder for "
                        f"mixed sizes")
    images = np.stack(arrays)
    if bad:  # not cached: a later run without --skip_bad_images must still see the broken files
        return FolderArray(images, targets, classes, [str(f) for f, _ in bad], key, listing)
    if cache_write(cached, lambda f: np.savez(f, images=images, targets=np.asarray(targets, dtype=np.int64))):
        bound_cache(cached)
    return FolderArray(images, targets, classes, [], key, listing)


def _leftovers(root: Path, new_dirs: list) -> list:
    """Empty sub-folders a failed download made inside a root it created itself (none in an existing root)."""
    if not new_dirs:
        return []
    return sorted((d for d in Path(os.path.abspath(root)).rglob("*") if d.is_dir()), key=lambda d: -len(d.parts))


def _missing(name: str, looked: list, extra: str = "") -> DataError:
    where = "\n  ".join(str(p) for p in looked)
    return DataError(f"{name} not found. Looked in:\n  {where}\nSet DATA_ROOT to the folder that holds it "
                     f"(unset, it is ./data when that is not empty, else ../shared/data next to the clone)"
                     f"{extra}.")


def _root_of(name: str, root: Optional[Path]) -> Path:
    """The folder holding ``name`` (the caller's, else :func:`data_root`); a file there is one line, not a failed
    download (torchvision's FileExistsError)."""
    root = Path(root) if root else data_root()
    if root.exists() and not root.is_dir():
        raise DataError(f"the data root {root} is a file, not a folder; set DATA_ROOT to the folder that holds "
                        f"{name}/")
    return root


def _cifar(name: str, train: bool, skip_bad_images: Optional[bool] = None, root: Optional[Path] = None) -> ArrayImages:
    root = _root_of(name, root)
    split = "train" if train else "test"
    folder = root / name / split
    if folder.is_dir():
        got = folder_to_array(folder, f"{name}-{split}", skip_bad_images)
        ds = ArrayImages(got.images, got.targets, got.classes, name, 32)
        ds.bad_images, ds.fingerprint, ds.listing = got.bad, got.fingerprint, got.listing
        return ds
    from torchvision import datasets as tvd
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    try:
        ds = cls(root=str(root), train=train, download=False)
    except RuntimeError:
        new_dirs = _created_dirs(root)
        try:
            ds = cls(root=str(root), train=train, download=True)
        except Exception as e:
            _remove_empty([*_leftovers(root, new_dirs), *new_dirs])
            raise _missing(name, [folder, root / cls.base_folder],
                           f"; downloading failed too ({type(e).__name__}: offline?)") from None
    out = ArrayImages(np.asarray(ds.data), ds.targets, list(ds.classes), name, 32)
    out.fingerprint, out.listing = files_identity(_files_under(root / cls.base_folder), root)
    return out


def _files_under(folder: Path) -> list:
    """Every regular file under ``folder`` (the binary batches a torchvision dataset reads)."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _stl10(split: str, root: Optional[Path] = None) -> ArrayImages:
    root = _root_of("stl10", root)
    parts = {"pretrain": ["train", "unlabeled"], "train": ["train"], "test": ["test"]}[split]
    arrays, targets, classes, identities = [], [], None, []
    for part in parts:
        folder = root / "stl10" / part
        if folder.is_dir():
            if part == "unlabeled":  # flat folder of images, no classes
                files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS)
                arrays.append(np.stack([_decode(f) for f in files]))
                targets += [-1] * len(files)
                identities.append(files_identity(files, root))
            else:
                got = folder_to_array(folder, f"stl10-{part}")
                arrays.append(got.images)
                targets += got.targets
                classes = got.classes
                identities.append((got.fingerprint, got.listing))
            continue
        from torchvision import datasets as tvd
        try:
            ds = tvd.STL10(root=str(root), split=part, download=False)
        except RuntimeError:
            new_dirs = _created_dirs(root)
            try:
                ds = tvd.STL10(root=str(root), split=part, download=True)
            except Exception as e:
                _remove_empty([*_leftovers(root, new_dirs), *new_dirs])
                raise _missing("stl10", [folder, root / "stl10_binary"],
                               f"; downloading failed too ({type(e).__name__}: offline?)") from None
        arrays.append(np.asarray(ds.data).transpose(0, 2, 3, 1))
        targets += [int(t) for t in ds.labels]
        classes = list(ds.classes)
        identities.append(files_identity(_files_under(root / ds.base_folder), root))
    out = ArrayImages(np.concatenate(arrays), targets, classes or [], "stl10", 96)
    out.fingerprint, out.listing = (hashlib.sha1("|".join(ids).encode()).hexdigest()[:16] for ids in zip(*identities))
    return out


def data_folder(data: str, data_path: str = "") -> Optional[Path]:
    """The folder a dataset's images are read from (its class folders below it): a run folder must never be made
    inside it, or the next scan reads the run as a class of images."""
    if data == "folder":
        return Path(data_path) if data_path else None
    if data == "imagenet":
        return Path(os.environ["IMAGENET_PATH"]) if os.environ.get("IMAGENET_PATH") else None
    return data_root() / data


def _split_folder(base: Path, train: bool) -> Path:
    if train:
        return base / "train"
    for name in ("test", "val"):
        if (base / name).is_dir():
            return base / name
    return base / "test"


def get_dataset(data: str, split: str, data_path: str = "", image_size: int = 0,
                skip_bad_images: Optional[bool] = None, root: Optional[Path] = None) -> LabeledImages:
    """split: 'pretrain' (what SimCLR trains on), 'train' (labelled train split), 'test'.

    ``skip_bad_images``: True skips unreadable files; False refuses them, naming the option; None (a command
    without that option) refuses them without naming it.

    ``root``: the folder holding CIFAR / STL-10 (default: ``DATA_ROOT``), for callers that know where a
    run read its images (the report) without changing the process environment.
    """
    if split not in ("pretrain", "train", "test"):
        raise ValueError(f"split must be pretrain, train or test, got {split!r}")
    train = split != "test"
    size = image_size or NATIVE_SIZE.get(data, 224)
    if data in ("cifar10", "cifar100"):
        ds = _cifar(data, train, skip_bad_images, root)
    elif data == "stl10":
        ds = _stl10(split, root)
    elif data in ("imagenet", "folder"):
        if data == "imagenet":
            env = os.environ.get("IMAGENET_PATH", "")
            if not env:
                raise DataError("ImageNet needs IMAGENET_PATH: export IMAGENET_PATH=/path/with/train-and-val")
            base = Path(env)
        else:
            base = Path(data_path)
        folder = _split_folder(base, train)
        if not folder.is_dir():
            source = "--data_path" if data == "folder" else "IMAGENET_PATH"
            raise DataError(f"the {folder.name} split of {source} not found: {folder} (expected {base}/train and "
                            f"{base}/test or {base}/val, each with one sub-folder per class)")
        files, targets, classes, bad, fingerprint, listing = once(
            ("folder", os.path.abspath(folder), skip_bad_images), lambda: _read_folder(folder, skip_bad_images))
        ds = FileImages(files, targets, classes, data, size, skip_bad_images)
        ds.bad_images.extend(bad)
        ds.fingerprint, ds.listing = fingerprint, listing
    else:
        raise DataError(f"unknown dataset {data!r}; allowed: {', '.join(DATASETS)}")
    ds.image_size = size
    if len(ds) == 0:
        raise DataError(f"dataset {data} ({split}) is empty")
    return ds


def _read_folder(folder: Path, skip_bad_images: Optional[bool]) -> tuple:
    """One read of an image folder at start: the walk, the content identity (one open + fstat per file) and the
    header check from the bytes that read returned. -> (files, targets, classes, bad, fingerprint, listing)."""
    t = time.perf_counter()
    files, targets, classes, special = scan_folder(folder)
    listed(folder, len(files), time.perf_counter() - t, "listed")
    t = time.perf_counter()
    heads: list = []
    fingerprint, listing = files_identity(files, folder, heads if len(files) <= HEADER_CHECK_MAX else None)
    files, targets, bad = check_headers(files, targets, skip_bad_images, heads or None)
    listed(folder, len(files), time.perf_counter() - t, "identified and checked")
    if not files:
        raise DataError(f"image folder {folder} holds no readable image ({len(bad) + len(special)} unreadable files)")
    return files, targets, classes, bad + special, fingerprint, listing


def check_same_classes(train: LabeledImages, test: LabeledImages) -> None:
    """Refuse a train/test pair whose class lists differ: labels are indices into each split's own sorted list,
    so a test split lacking one class would be scored against shifted training labels."""
    if list(test.classes) != list(train.classes):
        missing = sorted(set(train.classes) ^ set(test.classes))
        raise DataError(f"the test split's classes differ from the training split's ({len(test.classes)} vs "
                        f"{len(train.classes)}; not in both: {', '.join(map(str, missing[:5])) or 'order'}); "
                        f"both need the same class folders")


def balanced_indices(targets: Sequence[int], n: int, seed: int = 0) -> list:
    """``n`` indices drawn class-balanced (as equal as possible per class), reproducible for a seed.

    Unlabeled items (target -1) are treated as one class of their own.
    """
    targets = np.asarray(targets)
    if n >= len(targets):
        return list(range(len(targets)))
    rng = np.random.default_rng(seed)
    classes = np.unique(targets)
    per_class = {c: rng.permutation(np.flatnonzero(targets == c)) for c in classes}
    base, extra = divmod(n, len(classes))
    order = rng.permutation(len(classes))
    chosen = []
    for rank, ci in enumerate(order):
        c = classes[ci]
        k = base + (1 if rank < extra else 0)
        if k > len(per_class[c]):
            raise DataError(f"class {c} has only {len(per_class[c])} images; cannot draw {k} of it")
        chosen.extend(per_class[c][:k].tolist())
    return sorted(chosen)


def maybe_subset(ds: LabeledImages, n: int, seed: int = 0) -> LabeledImages:
    return ds.subset(balanced_indices(ds.targets, n, seed)) if n and n < len(ds) else ds


def native_size(data: str, image_size: int = 0) -> int:
    return image_size or NATIVE_SIZE.get(data, 224)
