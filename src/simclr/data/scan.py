"""Reading an image folder's file list once per start: one walk, at most one stat per file, shared by every use.

At ImageNet scale (1.28M files) the set-up before step 1 is file-system work: the walk of the class folders, the
content identity (:mod:`.identity`) and, for folders of up to :data:`HEADER_CHECK_MAX` files, a check that each
file is an image. Each used to cost its own pass (a stat per file in the walk, an open in the identity, another
in PIL's header check), and pretraining read the same split twice (its images, then the kNN monitor's labelled
train split). Here:

* the walk lists directory entries (``os.scandir``): a regular file is known by its entry type, without a stat;
* the identity's one open + fstat per file also returns the file's first bytes, and the header check reads those
  (a file PIL cannot recognise from them alone, say a JPEG with a very large EXIF block, is opened again: only
  such files pay a second open);
* within :func:`one_scan` (pretraining's set-up), a folder read once is not read again.
"""
from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from PIL import Image
from torchvision.datasets.folder import find_classes

from ..errors import DataError
from ..progress import ALWAYS, rate

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Folders with up to this many files have every file's header checked before training starts, so a
# non-image file fails (or is skipped) before any run folder is written; bigger ones (ImageNet) are
# checked as they are read, which costs nothing up front.
HEADER_CHECK_MAX = 100_000

SAY_AFTER = 2.0  # seconds: a listing that takes longer says what it found and how fast


def _walk_class(folder: str, is_image: Callable[[os.DirEntry], bool]) -> list:
    """Image paths under one class folder, in torchvision's order (folders sorted by path, files by name).
    Directory symlinks inside it are not followed (a link back up the tree would repeat the class, two links
    would make the walk exponential); a symlinked FILE is kept when it points at a regular file."""
    found, stack = [], [folder]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        names = []
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            elif is_image(e):
                names.append(e.name)
        found.append((d, sorted(names)))
    return [os.path.join(d, n) for d, names in sorted(found) for n in names]


class PathList(Sequence):
    """File paths as one byte buffer and an offset array: no Python object per file.

    DataLoader workers are forked; a list of 1.28M ``Path`` objects is shared copy-on-write, and every access
    touches an object's reference count, so each worker's memory grew by the whole list over a long run (about
    0.3 MB/s measured at 1.28M files, 8 workers per GPU: an out-of-memory kill after hours). Two numpy arrays
    are read without writing to them. ``files[i]`` is a ``Path``."""

    def __init__(self, paths: Sequence = ()):
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n, i = len(self), int(i)
        if not -n <= i < n:
            raise IndexError(f"file {i} of {n}")
        i %= n
        return Path(os.fsdecode(self._bytes[self._offsets[i]:self._offsets[i + 1]].tobytes()))

    def take(self, indices) -> "PathList":
        return PathList([self[int(i)] for i in indices])


def scan_folder(root: Path) -> tuple[list, list, list, list]:
    """``root/<class>/<image>`` -> (files, targets, classes, skipped), classes sorted (torchvision's order);
    ``skipped``: entries named like images that are not regular files (a FIFO, socket, device or broken
    link named x.jpg would block the reader forever or fail), left out and counted as unreadable.
    A class folder may itself be a symlink (a subset made of links); links to folders inside it are not
    followed (see :func:`_walk_class`)."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    try:  # torchvision's own class list (ImageFolder's class order)
        classes, class_to_idx = find_classes(str(root))
    except FileNotFoundError:
        classes, class_to_idx = [], {}
    skipped: list = []

    def is_image(e: os.DirEntry) -> bool:
        if not e.name.lower().endswith(IMG_EXTENSIONS):
            return False
        try:
            if e.is_file():  # the entry's own type for a regular file; a stat only for a symlink
                return True
        except OSError:
            pass
        skipped.append(e.path)
        return False

    found = [(p, class_to_idx[c]) for c in classes for p in _walk_class(os.path.join(str(root), c), is_image)]
    files, targets = [Path(p) for p, _ in found], [t for _, t in found]
    if not files:
        raise DataError(f"image folder {root} holds no images: expected {root}/<class>/<image>.jpg "
                        f"(extensions: {', '.join(IMG_EXTENSIONS)})")
    return files, targets, classes, sorted(skipped)


def header_problem(path, head: Optional[bytes] = None) -> str:
    """"" when PIL recognises the image's header (from ``head``, the file's first bytes, when given; from the file
    when they do not suffice), else the reason."""
    if head is not None:
        try:
            with Image.open(io.BytesIO(head)):
                return ""
        except Exception:  # too few bytes for this format's header, or not an image: ask the file
            pass
    try:
        with Image.open(path):
            return ""
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError ... depending on the format
        return f"{type(e).__name__}: {e}"


def bad_image_fix(skip_bad_images: Optional[bool]) -> str:
    """How to get past an unreadable image. ``skip_bad_images`` None: the command has no --skip_bad_images
    (evaluation, the kNN sets), so the message never suggests an option it would refuse."""
    if skip_bad_images is None:
        return "Remove or replace the file."
    return ("Remove or replace the file, or pass --skip_bad_images true to skip unreadable files (they are "
            "counted in the log).")


def _bad_image_error(path, reason: str, n_bad: int, skip_bad_images: Optional[bool]) -> DataError:
    more = f" ({n_bad} unreadable files in all)" if n_bad > 1 else ""
    return DataError(f"cannot read image {path}: {reason}{more}. {bad_image_fix(skip_bad_images)}")


def check_headers(files: list, targets: list, skip_bad_images: Optional[bool],
                  heads: Optional[list] = None) -> tuple[list, list, list]:
    """Drop (with skip_bad_images) or refuse files that are not images. Returns (files, targets, bad).
    ``heads``: each file's first bytes, read by the identity pass (then no file is opened again here, unless its
    first bytes do not settle it)."""
    if len(files) > HEADER_CHECK_MAX:
        return files, targets, []
    with ThreadPoolExecutor(max_workers=16) as ex:
        problems = list(ex.map(header_problem, files, heads if heads is not None else [None] * len(files),
                               chunksize=64))
    bad = [(f, why) for f, why in zip(files, problems) if why]
    if bad and not skip_bad_images:
        raise _bad_image_error(bad[0][0], bad[0][1], len(bad), skip_bad_images)
    keep = [i for i, why in enumerate(problems) if not why]
    return [files[i] for i in keep], [targets[i] for i in keep], [str(f) for f, _ in bad]


def listed(folder: Path, n: int, seconds: float, what: str) -> None:
    """The progress line of a long listing: how many files, how long, how fast (files/s)."""
    if seconds >= SAY_AFTER:
        log.info(f"{what} {n} image files of {folder} in {seconds:.1f} s ({rate(n / max(seconds, 1e-9))} files/s)",
                 extra=ALWAYS)


# --------------------------------------------------------------------------------------------
# one read per folder within a start
# --------------------------------------------------------------------------------------------
_memo: Optional[dict] = None


@contextmanager
def one_scan():
    """Within this block a folder's listing, identity and header check (or its decoded array) are computed once:
    the pretraining split and the kNN monitor's train split of the same folder share them. Outside, every call
    reads the folder afresh (a changed folder is seen)."""
    global _memo
    outer = _memo
    if outer is None:
        _memo = {}
    try:
        yield
    finally:
        if outer is None:
            _memo = None


def once(key: tuple, make: Callable):
    """``make()``, or its result from earlier in the same :func:`one_scan` block. Callers build their own
    dataset objects from it (the lists in it are shared, never changed)."""
    if _memo is None:
        return make()
    if key not in _memo:
        _memo[key] = make()
    return _memo[key]
