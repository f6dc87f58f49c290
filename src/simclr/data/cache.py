"""The optional on-disk cache under ``$SIMCLR_CACHE`` (default ``~/.cache/simclr``): decoded image arrays
(``<name>-<content id>.npz``) and extracted features (``features/<key>.pt``).

Entries are keyed by the content identity of the images (:mod:`.identity`), so jobs that stage the same data
to a new path each time share one entry. The cache is bounded: after each write, the least recently used
entries are removed until the total is at most ``$SIMCLR_CACHE_MAX_GB`` (default :data:`DEFAULT_MAX_GB`;
``inf`` for no bound). A use is recorded in the entry's modification time, since access times are not kept
on most cluster file systems (``noatime``, ``relatime``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from ..errors import UserError

DEFAULT_MAX_GB = 20.0  # CIFAR-10's two arrays are ~180 MB; one ResNet-50's ImageNet train features ~10 GB

# only what this package writes is ever evicted: SIMCLR_CACHE may name a folder that holds other files
_ENTRY = re.compile(r"[^.].*-[0-9a-f]{16}\.npz")
_FEATURES = re.compile(r"[0-9a-f]{24}\.pt")


def cache_dir() -> Path:
    """The optional cache's folder (made by :func:`simclr.files.cache_write` when something is first written)."""
    return Path(os.environ.get("SIMCLR_CACHE", Path.home() / ".cache" / "simclr"))


def max_bytes() -> float:
    raw = os.environ.get("SIMCLR_CACHE_MAX_GB", "").strip()
    if not raw:
        return DEFAULT_MAX_GB * 1e9
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not gb > 0:
        raise UserError(f"SIMCLR_CACHE_MAX_GB must be a positive number of gigabytes (or inf), got {raw!r}; "
                        f"unset it for the default {DEFAULT_MAX_GB:g}")
    return gb * 1e9


def cache_used(path: Path) -> None:
    """Mark an entry as just used (read from the cache), so eviction takes the others first."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves its entries
        pass


def entries(folder: Optional[Path] = None) -> list:
    """[(last use, size, path)] of every entry the package wrote under ``folder`` (default: :func:`cache_dir`)."""
    folder = Path(folder) if folder is not None else cache_dir()
    found = []
    for sub, pattern in ((folder, _ENTRY), (folder / "features", _FEATURES)):
        try:
            names = os.listdir(sub)
        except OSError:
            continue
        for name in names:
            if pattern.fullmatch(name):
                try:
                    st = os.stat(sub / name)
                except OSError:  # removed meanwhile by another process
                    continue
                found.append((st.st_mtime, st.st_size, sub / name))
    return found


def bound_cache(keep: Path) -> list:
    """After ``keep`` was written: remove the least recently used entries until the cache holds at most
    :func:`max_bytes` (``keep`` itself is never removed). Returns the removed paths."""
    limit = max_bytes()
    found = sorted(entries())
    total = sum(size for _, size, _ in found)
    removed = []
    for _, size, path in found:
        if total <= limit:
            break
        if path == Path(keep):
            continue
        try:
            path.unlink()
        except FileNotFoundError:  # another process evicted it first
            pass
        except OSError:
            continue
        total -= size
        removed.append(path)
    return removed
