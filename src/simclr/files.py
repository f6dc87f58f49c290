"""Writing files so that a crash, a full disk or a second writer never leaves a half-written file.

Every file the package writes (checkpoints, cards, status.json, config.yaml, eval.json, feature caches,
report pages and figures) goes through :func:`atomic_write`: the bytes go to a uniquely named temporary
file in the same folder, are flushed and fsynced, and the temporary file is renamed over the target
(``os.replace`` is atomic on POSIX), then the folder is fsynced. Readers see the old file or the new one.

Also :func:`git_state`: which commit the package's own source files are, and whether they differ from it.
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

from .errors import UserError

Content = Union[bytes, str, Callable]

# torch's zip writer reports a full disk as a RuntimeError from C++ rather than OSError(ENOSPC)
_TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "unexpected pos", "file write failed")
LOW_SPACE = 64 << 20  # with less free space than this a failed write is reported as a full disk


class DiskFullError(UserError):
    """No space left while writing: the previous version of the file is intact."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A fresh, unique temporary name beside ``path`` that keeps its suffix (matplotlib picks the format
    from it). Unique per call, so two writers never remove each other's temporary file.

    Created with mode 0o666 minus the umask, as ``open()`` would (``mkstemp`` makes 0o600: a report or
    checkpoint would then be unreadable to the rest of a team sharing the runs folder)."""
    for _ in range(100):
        name = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}"
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return name
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))  # pragma: no cover


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and ".tmp" in path.name


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return LOW_SPACE + 1


def write_error(path: Path, e: BaseException) -> UserError | None:
    """A write failure as one clear UserError, or None when it is not a file-system problem."""
    if isinstance(e, OSError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFullError(f"disk full while writing {path}; the previous version is intact. "
                                 f"Free space and run again (a training run resumes with --resume auto).")
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            return UserError(f"cannot write {path}: {e.strerror}. Choose a writable folder (e.g. --root).")
        if e.errno == errno.EISDIR:
            return UserError(f"cannot write {path}: a folder of that name is in the way; move it aside")
        return None
    if isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_WRITE_FAILURES):
        if _free_bytes(path.parent) < LOW_SPACE:
            return DiskFullError(f"disk full while writing {path}; the previous version is intact. "
                                 f"Free space and run again (a training run resumes with --resume auto).")
        return UserError(f"writing {path} failed ({' '.join(str(e).split())[:120]}); the previous version is "
                         f"intact")
    return None


def atomic_write(path: Path, content: Content, *, before_replace: Callable[[Path], None] | None = None) -> None:
    """Write ``content`` (bytes, text, or a function ``f(file_object)`` such as ``lambda f: torch.save(x, f)``
    or ``lambda f: fig.savefig(f, format='png')``) to ``path`` atomically.

    ``before_replace(tmp)`` runs after the data is on disk and before the rename (e.g. to write a checksum
    card of the temporary file first). On any failure the temporary file is removed, ``path`` keeps its old
    content, and a file-system error becomes one :class:`UserError` line.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: a folder of that name is in the way; move it aside")
    tmp = None
    try:
        tmp = temp_path(path)
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        err = write_error(path, e)
        if err is not None:
            raise err from None
        raise


class GitState(NamedTuple):
    """The git commit of a checkout and whether its tracked files differ from it (uncommitted edits)."""

    commit: str  # full hash of HEAD; "" outside a git checkout (an installed package) or without git
    dirty: Optional[bool]  # None when commit is ""

    @property
    def label(self) -> str:
        """``1a2b3c4`` or ``1a2b3c4+dirty`` (``unknown`` outside a checkout): how benchmark results name the code."""
        return self.commit[:7] + ("+dirty" if self.dirty else "") if self.commit else "unknown"


def git_state(where: Optional[Path] = None) -> GitState:
    """:class:`GitState` of the git checkout holding ``where`` (default: this package's source files). Dirty means
    a tracked file is modified or staged; untracked files do not count (``git status --untracked-files=no``)."""
    cwd = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return GitState("", None)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return GitState("", None)
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return GitState(head.stdout.strip(), dirty)
