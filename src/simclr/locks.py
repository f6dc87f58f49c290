"""flock(2) as the run folder and the checkpoint readers use it, on the file systems clusters really have.

- Where the file system keeps no such locks (Lustre mounted ``noflock``: ENOSYS; some FUSE and network file
  systems: EOPNOTSUPP; NFS without its lock manager: ENOLCK) the commands work without them: :func:`try_lock`
  answers :data:`NONE` and one warning per process names the file system and what is no longer prevented.
- NFS emulates flock with a byte-range lock, and an exclusive one needs a file opened for writing (a descriptor
  opened read-only gets EBADF). :func:`open_for_lock` therefore opens a file that is to be locked exclusively
  for writing (nothing is written to it).
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

HELD, BUSY, NONE = "held", "busy", "none"
# flock's answer where the file system keeps no locks at all (not: another process holds one)
# (EINVAL: the operations asked are valid, so it is the file system refusing them)
UNSUPPORTED = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.ENOLCK,
                         errno.EINVAL})
_HELD_ELSEWHERE = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})
_WARNED: list = []


def fs_type(path) -> str:
    """The type of the file system ``path`` lies on (``lustre``, ``nfs4``, ``ext4`` ...), '' when unknown."""
    try:
        where = os.path.realpath(path)
        best, kind = "", ""
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = where == mount or where.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, parts[2]
        return kind
    except OSError:
        return ""


def warn_unlocked(path, err: OSError) -> None:
    """The one warning of this process that it works without file locks (the first file that had none)."""
    if _WARNED:
        return
    _WARNED.append(str(path))
    kind = fs_type(Path(path).parent)
    what = f"the {kind} file system" if kind else "the file system"
    log.warning(f"warning: {what} of {Path(path).parent} keeps no file locks (flock: "
                f"{err.strerror or os.strerror(err.errno)}; e.g. Lustre mounted without flock); working "
                f"without them: nothing stops a second process from writing the same run folder, or a run from "
                f"pruning a checkpoint another command is reading")


def try_lock(fd: int, path, exclusive: bool, wait: bool = False) -> str:
    """flock ``fd`` (the open file ``path``): :data:`HELD` when taken, :data:`BUSY` when another process holds a
    conflicting lock (only without ``wait``), :data:`NONE` when the file system keeps no locks (one warning per
    process). Any other error is raised."""
    import fcntl
    op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        fcntl.flock(fd, op if wait else op | fcntl.LOCK_NB)
        return HELD
    except OSError as e:
        if e.errno in UNSUPPORTED:
            warn_unlocked(path, e)
            return NONE
        if e.errno in _HELD_ELSEWHERE and not wait:
            return BUSY
        raise


def open_for_lock(path, exclusive: bool) -> int:
    """A descriptor of the regular file ``path`` (never through a symlink) fit to be locked: for an exclusive
    lock opened for writing (NFS refuses an exclusive lock on a read-only descriptor), falling back to read-only
    where writing is not allowed. Raises OSError."""
    base = os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0)
    if exclusive:
        try:
            return os.open(path, os.O_RDWR | base)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
    return os.open(path, os.O_RDONLY | base)
