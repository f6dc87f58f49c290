"""simclr.data.scan: a start reads an image folder once (one walk, at most one stat per file), shared by the
pretraining split and the kNN monitor's train split; the header check reads the bytes the identity pass read."""
from __future__ import annotations

import collections
import json
import os
import shutil

import pytest

from tests.conftest import run_cli, tiny_args
from simclr.data import datasets, get_dataset, scan
from simclr.errors import DataError

CLASSES = ("airplane", "cat", "ship")


def _folder(data_root, dest, n_train=20, n_test=10):
    for split, n in (("train", n_train), ("test", n_test)):
        for c in CLASSES:
            (dest / split / c).mkdir(parents=True)
            for f in sorted((data_root / "cifar10" / split / c).iterdir())[:n]:
                shutil.copy(f, dest / split / c / f.name)
    return dest


class Calls:
    """Counts, per path, the stats (os.stat, os.lstat, and os.fstat of a descriptor os.open gave) and the
    directory listings (os.scandir) the process makes."""

    def __init__(self, monkeypatch):
        self.stats, self.listings, self.fds = collections.Counter(), collections.Counter(), {}
        real = {name: getattr(os, name) for name in ("stat", "lstat", "fstat", "open", "scandir")}

        def stat(path, *a, **k):
            self.stats[os.path.abspath(os.fspath(path))] += 1 if isinstance(path, (str, os.PathLike)) else 0
            return real["stat"](path, *a, **k)

        def lstat(path, *a, **k):
            self.stats[os.path.abspath(os.fspath(path))] += 1
            return real["lstat"](path, *a, **k)

        def open_(path, *a, **k):
            fd = real["open"](path, *a, **k)
            self.fds[fd] = os.path.abspath(os.fspath(path))
            return fd

        def fstat(fd):
            if fd in self.fds:
                self.stats[self.fds[fd]] += 1
            return real["fstat"](fd)

        def scandir(path="."):
            self.listings[os.path.abspath(os.fspath(path))] += 1
            return real["scandir"](path)

        for name, fn in (("stat", stat), ("lstat", lstat), ("fstat", fstat), ("open", open_), ("scandir", scandir)):
            monkeypatch.setattr(os, name, fn)


def test_a_start_walks_the_folder_once_and_stats_each_file_at_most_once(tmp_path, data_root, monkeypatch):
    data = _folder(data_root, tmp_path / "data")
    images = sorted(str(p) for p in (data / "train").rglob("*.jpg"))
    calls = Calls(monkeypatch)
    r = run_cli("pretrain", *tiny_args(tmp_path, data="folder", data_path=data, image_size=32, train_subset=0,
                                       test_subset=0, iters=1, batch_size=16, eval_at_start="false"))
    monkeypatch.undo()
    assert r.returncode == 0, r.stderr[-2000:]
    assert max(calls.stats[f] for f in images) <= 1, {f: calls.stats[f] for f in images if calls.stats[f] > 1}
    for d in [data / "train", *[data / "train" / c for c in CLASSES]]:
        assert calls.listings[str(d)] == 1, (d, calls.listings[str(d)])


def test_outside_a_start_a_changed_folder_is_read_afresh(tmp_path, data_root):
    data = _folder(data_root, tmp_path / "data", n_train=4, n_test=2)
    with scan.one_scan():
        first = datasets.get_dataset("folder", "train", str(data), 32)
        (data / "train" / "cat" / sorted(os.listdir(data / "train" / "cat"))[0]).unlink()
        assert len(datasets.get_dataset("folder", "pretrain", str(data), 32)) == len(first)  # the same start
    assert len(datasets.get_dataset("folder", "train", str(data), 32)) == len(first) - 1


def test_the_header_check_from_the_first_bytes_refuses_what_the_file_check_refuses(tmp_path, data_root):
    data = _folder(data_root, tmp_path / "data", n_train=3, n_test=2)
    (data / "train" / "cat" / "notes.jpg").write_text("not an image")
    with pytest.raises(datasets.DataError, match="notes.jpg"):
        datasets.get_dataset("folder", "train", str(data), 32, skip_bad_images=False)
    ds = datasets.get_dataset("folder", "train", str(data), 32, skip_bad_images=True)
    assert len(ds) == 9 and [os.path.basename(b) for b in ds.bad_images] == ["notes.jpg"]
    # an image whose first kilobyte does not settle its format (a JPEG with a large EXIF block) is still an image
    big = data / "train" / "ship" / "exif.jpg"
    from PIL import Image
    Image.open(next((data / "train" / "ship").iterdir())).save(big, exif=b"Exif\x00\x00" + b"\x00" * 20000)
    assert scan.header_problem(big, big.read_bytes()[:1024]) == ""


def _private_growth_in_a_forked_child(touch) -> int:
    """Bytes of private (copy-on-write) memory a forked child gains by running ``touch()``: what a DataLoader
    worker gains by reading the parent's file list."""
    def private() -> int:
        with open("/proc/self/smaps_rollup") as f:
            return sum(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(("Private_Dirty", "Private_Clean")))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, leave without running the parent's cleanup
        try:
            before = private()
            touch()
            os.write(w, str(private() - before).encode())
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 64)
    os.waitpid(pid, 0)
    return int(out)


def test_forked_workers_reading_the_file_list_do_not_copy_it():
    from pathlib import Path
    names = [f"/data/imagenet/train/n{i % 1000:08d}/img_{i:08d}.JPEG" for i in range(300_000)]
    objects = [Path(p) for p in names]  # the old layout: one Python object per file
    packed = scan.PathList(names)
    assert [str(packed[i]) for i in (0, 1, 299_999, -1)] == [names[0], names[1], names[-1], names[-1]]
    def read_all(files):  # what workers do over an epoch: look up each file's path, keep nothing
        def touch():
            for i in range(len(files)):
                str(files[i])
        return touch
    grown_list = _private_growth_in_a_forked_child(read_all(objects))
    grown_packed = _private_growth_in_a_forked_child(read_all(packed))
    assert grown_list > 10 * 2 ** 20  # the harness sees the copy-on-write growth of the old layout ...
    assert grown_packed < grown_list / 5  # ... and the packed list does not grow like it


def test_a_fifo_named_like_an_image_is_skipped_not_waited_for(tmp_path, data_root):
    import shutil
    for c in ("cat", "dog"):
        (tmp_path / "d" / "train" / c).mkdir(parents=True)
        (tmp_path / "d" / "test" / c).mkdir(parents=True)
        for f in sorted((data_root / "cifar10" / "train" / c).iterdir())[:16]:
            shutil.copy(f, tmp_path / "d" / "train" / c / f.name)
        for f in sorted((data_root / "cifar10" / "test" / c).iterdir())[:8]:
            shutil.copy(f, tmp_path / "d" / "test" / c / f.name)
    os.mkfifo(tmp_path / "d" / "train" / "cat" / "zz.jpg")
    r = run_cli("pretrain", *tiny_args(tmp_path, data="folder", data_path=tmp_path / "d", image_size=32,
                                       train_subset=0, test_subset=0, batch_size=8, iters=1, knn_k=5), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # a counted skip with a warning (also in log.txt, metrics.jsonl and status.json)
    assert f"warning: skipped 1 unreadable image file(s), e.g. {tmp_path / 'd' / 'train' / 'cat' / 'zz.jpg'}" \
        in r.stderr
    (run,) = [p.parent for p in (tmp_path / "logs").glob("t/*/status.json")]
    assert json.loads((run / "status.json").read_text())["metrics"]["skipped_images"] == 1
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["skipped_images"] == 1


def test_a_missing_folder_split_is_named_plainly(tmp_path):
    with pytest.raises(DataError) as e:
        get_dataset("folder", "train", data_path=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "folder split folder" not in msg
    assert msg.startswith(f"the train split of --data_path not found: {tmp_path / 'nowhere' / 'train'}")
