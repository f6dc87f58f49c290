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
import logging
import os
import secrets
import shutil
import subprocess
import stat
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

from .errors import UserError

log = logging.getLogger(__name__)

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


def _refuse_special(path: Path) -> None:
    """A rename over a device, FIFO or socket would replace it for every program (``--out /dev/null``, as root,
    replaced the machine's /dev/null with a regular file): refused, naming it."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    kind = ("a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "")
    if kind:
        raise UserError(f"cannot write {path}: it is {kind}, not a file, and writing would replace it for every "
                        f"program; name a file instead")


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
    _refuse_special(path)
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


_CACHE_WARNED: set = set()


def cache_write(path: Path, content: Content) -> bool:
    """``atomic_write`` into an optional cache ($SIMCLR_CACHE): a cache that cannot be written (full, read-only,
    a file where its folder goes) is one warning per process, never an error - the work is done without it.
    Returns whether the file was written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, content)
        return True
    except (OSError, UserError) as e:
        if path.parent not in _CACHE_WARNED:
            _CACHE_WARNED.add(path.parent)
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            log.warning(f"warning: cannot write the cache {path.parent} ({why}); continuing without it (set "
                        f"SIMCLR_CACHE to a writable folder to keep it)")
        return False


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
# ---------------------------------------------------------------------------------------------
# run-folder files: only regular files and folders the run created, never a link followed
# ---------------------------------------------------------------------------------------------

def _not_ours(path: Path, what: str, folder: bool = False) -> UserError:
    return UserError(f"refusing to use {path}: it is {what}, not a {'folder' if folder else 'file'} this run wrote "
                     f"(a run folder holds only its own regular files and folders); move it aside and run again")


def check_own(path: Path, folder: bool = False) -> bool:
    """Whether ``path`` exists, refusing (one :class:`UserError` line) a symlink, or a special file (FIFO,
    socket, device) or a folder where a file belongs (``folder=False``), or a file where a folder belongs.
    ``lstat``: the link itself is judged, never what it points to."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # not there (a file in the way is said where it is written)
        return False
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        raise _not_ours(path, f"a symlink (to {target[:200]!r})", folder)
    if folder and not stat.S_ISDIR(st.st_mode):
        raise _not_ours(path, "a file", folder=True)
    if not folder and not stat.S_ISREG(st.st_mode):
        raise _not_ours(path, "a folder" if stat.S_ISDIR(st.st_mode) else "a special file (pipe, socket or device)")
    return True


def open_own(path: Path, flags: int, mode: int = 0o666) -> int:
    """``os.open`` of a run-folder file that never follows a symlink (``O_NOFOLLOW``) and refuses anything but a
    regular file; returns the descriptor. The one way the package opens a run folder's files for appending or
    locking (whole files are replaced by :func:`atomic_write`, whose rename replaces a link, never its target)."""
    path = Path(path)
    check_own(path)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink put there since the check
            raise _not_ours(path, "a symlink") from None
        raise write_error(path, e) or UserError(f"cannot open {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _not_ours(path, "a special file (pipe, socket or device)")
    if st.st_nlink > 1 and flags & (os.O_WRONLY | os.O_RDWR):
        # a hard link (a `cp -al` snapshot of the run, or a link to a file elsewhere) shares these bytes with
        # another name: appending would change that file too. The run takes a copy of its own first.
        os.close(fd)
        tmp = temp_path(path)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, path)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise write_error(path, e) or UserError(f"cannot copy {path} apart from its hard link: "
                                                    f"{e.strerror}") from None
        return open_own(path, flags, mode)
    return fd


def append_line(path: Path, text: str) -> None:
    """Append ``text`` (one or more whole lines) to a run-folder file, never through a symlink."""
    fd = open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# outputs: a command overwrites or deletes only what it wrote itself
# ---------------------------------------------------------------------------------------------
MARK_BYTES = 1 << 16


def written_by(path: Path, mark: bytes) -> bool:
    """Whether the regular file ``path`` carries ``mark`` in its first bytes (the PNG metadata or HTML
    ``generator`` tag our writers put there)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        return mark in os.read(fd, MARK_BYTES)
    finally:
        os.close(fd)


def claim_output(path: Path, ours, command: str, force: bool = False, option: str = "--out") -> None:
    """Refuse (one line naming --force) to write ``path`` when something is there that ``command`` did not
    write: a checkpoint, a user's picture or data, a folder, a link. ``ours`` tells an earlier output of the
    command: the mark (bytes) its writer puts in the first bytes, or a test of the regular file."""
    path = Path(path)
    if not os.path.lexists(path) or force and not path.is_dir():
        return
    if not path.is_symlink() and path.is_file() and (written_by(path, ours) if isinstance(ours, bytes)
                                                      else ours(path)):
        return
    what = "a folder" if path.is_dir() and not path.is_symlink() else \
        "a symlink" if path.is_symlink() else "a file that simclr " + command + " did not write"
    raise UserError(f"{path} exists and is {what}; refusing to overwrite it. Choose another {option}"
                    + ("" if path.is_dir() and not path.is_symlink() else ", or pass --force true to overwrite it"))


def read_small_json(path: Path, limit: int = MARK_BYTES, follow_links: bool = False):
    """A small JSON file (at most ``limit`` bytes, a regular file, never through a symlink unless
    ``follow_links``), or None."""
    import json
    nofollow = 0 if follow_links else os.O_NOFOLLOW
    try:
        fd = os.open(path, os.O_RDONLY | nofollow | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > limit:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def read_manifest(folder: Path, name: str = "manifest.json") -> list:
    """The file names a command's earlier run listed as its own outputs in ``folder`` (none: [])."""
    data = read_small_json(Path(folder) / name)
    files = data.get("files") if isinstance(data, dict) else None
    return [f for f in files if isinstance(f, str) and f and Path(f).name == f] if isinstance(files, list) else []


def replace_outputs(folder: Path, written: list, mark: bytes, name: str = "manifest.json") -> None:
    """After a command wrote ``written`` (names) into ``folder``: delete what its previous run listed and this one
    did not write again (only those, only regular files that carry the command's ``mark``: a manifest edited by
    hand cannot make it delete a user's file), then list ``written`` as its outputs. Called last, so a command
    that fails leaves the previous outputs in place."""
    import json
    folder = Path(folder)
    for old in set(read_manifest(folder, name)) - set(written):
        p = folder / old
        if p.is_file() and not p.is_symlink() and written_by(p, mark):
            p.unlink(missing_ok=True)
    atomic_write(folder / name, json.dumps({"files": sorted(written)}, indent=1))
