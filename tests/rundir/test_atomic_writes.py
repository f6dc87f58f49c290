"""simclr.files: atomic writes never replace what is not a file."""
from __future__ import annotations

import os
import stat

import pytest

from simclr.errors import UserError
from simclr.files import atomic_write


def test_an_atomic_write_over_a_fifo_or_device_is_refused_and_leaves_it(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="a FIFO, not a file"):
        atomic_write(fifo, b"x")
    assert fifo.is_fifo()
    device = tmp_path / "null"  # a second node of the null device (root may make one): never the real one
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        device = None
    if device is not None:
        with pytest.raises(UserError, match="a device"):
            atomic_write(device, b"x")
        assert stat.S_ISCHR(os.lstat(device).st_mode)
    atomic_write(tmp_path / "plain.txt", "ok")  # a file (new or old) is written as ever
    atomic_write(tmp_path / "plain.txt", "again")
    assert (tmp_path / "plain.txt").read_text() == "again"
