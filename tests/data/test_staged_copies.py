"""Data identity by content, replayed as clusters work: the images staged anew (another path, new mtimes, a path
holding the job id, one copy per node) before every job are the same data; an image rewritten with other bytes,
or a file added or removed, is not. Through the real CLI, in this process (two ranks: real processes)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.folder_runs import CLASSES, cli, knn_args, one_error, pretrain_args, tiny_data_setup
from simclr import checkpoint as ckpt_lib
from simclr.data import get_dataset
from simclr.data.identity import files_identity

_DATA: list = []


_setup = tiny_data_setup(_DATA, n_train=4, n_test=3)


def stage(src: Path, dst: Path, how: str) -> Path:
    """A copy of ``src`` at ``dst`` as a job script makes it: ``cp -r`` (new mtimes) or ``cp -a``/``rsync -a``
    (the same mtimes, another path)."""
    shutil.copytree(src, dst, copy_function=shutil.copy if how == "cp -r" else shutil.copy2)
    if how == "cp -r":  # a plain copy gets the time of copying: later than the original's
        for f in (p for p in dst.rglob("*") if p.is_file()):
            os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10 ** 9))
    return dst


def touch_all(folder: Path) -> None:
    for f in (p for p in folder.rglob("*") if p.is_file()):
        os.utime(f, ns=(f.stat().st_atime_ns + 7 * 10 ** 9, f.stat().st_mtime_ns + 7 * 10 ** 9))


def rewrite_same_size(image: Path) -> None:
    """Other pixels under the same name and size: the JPEG's first quantisation step doubled (a valid image)."""
    data = bytearray(image.read_bytes())
    dqt = data.index(b"\xff\xdb")  # marker, 2-byte length, precision/id byte, then the 64 steps
    data[dqt + 5] = data[dqt + 5] * 2 % 256 or 1
    image.write_bytes(bytes(data))


def first_image(folder: Path) -> Path:
    return sorted((folder / "train" / CLASSES[1]).iterdir())[0]


def last_step(run: Path) -> int:
    return max(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*.pt"))


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def interrupted_run(data: Path, tmp_path: Path) -> Path:
    """A 4-step run stopped after 2 steps on ``data``: what a pre-empted job leaves."""
    rc, out, err = cli(*pretrain_args(data, tmp_path / "logs", iters=4, batch_size=8), "--stop_after", 2)
    assert rc == 0, err
    (run,) = [p for p in (tmp_path / "logs" / "t").iterdir() if p.is_dir()]
    assert status(run)["status"] == "interrupted" and last_step(run) == 2
    return run


# ---------------------------------------------------------------------------------------------------------------
# the identity itself
# ---------------------------------------------------------------------------------------------------------------
def test_the_identity_is_the_content_not_the_path_or_the_modification_time(tmp_path):
    a = stage(_DATA[0], tmp_path / "a", "cp -a")
    first = files_identity(sorted(a.rglob("*.*")), a)
    for copy in (stage(a, tmp_path / "job-123" / "data", "cp -r"), stage(a, tmp_path / "b", "cp -a")):
        assert files_identity(sorted(copy.rglob("*.*")), copy) == first
    touch_all(a)
    assert files_identity(sorted(a.rglob("*.*")), a) == first
    rewrite_same_size(first_image(a))
    content, listing = files_identity(sorted(a.rglob("*.*")), a)
    assert listing == first[1] and content != first[0]  # same names and sizes, other bytes
    assert (np.asarray(Image.open(first_image(a))) != np.asarray(Image.open(first_image(_DATA[0])))).any()


def test_a_big_file_is_told_apart_by_its_edges_and_its_size(tmp_path):
    """Files over SMALL bytes are identified by their first and last EDGE bytes and size (see identity.py)."""
    from simclr.data import identity
    f = tmp_path / "big.jpg"
    body = bytes(range(256)) * (identity.SMALL // 128)  # 2 x SMALL bytes
    f.write_bytes(body)
    ref = identity.file_digest(f)
    assert ref[0] == len(body)
    f.write_bytes(body[:-1] + b"\x00")  # the last byte: in the tail that is read
    assert identity.file_digest(f) != ref
    f.write_bytes(b"\x01" + body[1:])   # the first byte
    assert identity.file_digest(f) != ref
    f.write_bytes(body + b"\x00")       # one byte longer
    assert identity.file_digest(f)[0] == len(body) + 1


# ---------------------------------------------------------------------------------------------------------------
# item 1: a resume on staged data goes on; on other images it is refused (and says so in status.json)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["cp -r", "cp -a", "touch"])
def test_a_resume_on_staged_data_trains_to_the_end(tmp_path, how):
    """Observation: every (re)queued job that staged the images anew was refused ("training images changed ...
    moved, copied or rewritten", exit 2). Now the same images at another path (one holding the job id), with
    new modification times, or touched, continue the run to its last step."""
    src = stage(_DATA[0], tmp_path / "job-41" / "data", "cp -a")
    run = interrupted_run(src, tmp_path)
    if how == "touch":
        touch_all(src)
        staged = src
    else:
        staged = stage(src, tmp_path / "job-42" / "data", how)
        shutil.rmtree(src)  # the first job's node-local copy is gone
    rc, out, err = cli(*pretrain_args(staged, tmp_path / "logs", iters=4, batch_size=8), "--resume", run)
    assert rc == 0, err
    log = (run / "log.txt").read_text()
    assert "at step 2" in log and "changed" not in log + err, log
    assert last_step(run) == 4 and status(run)["status"] == "finished"


@pytest.mark.parametrize("change", ["rewritten_same_size", "file_added", "file_removed"])
def test_a_resume_on_other_images_is_refused_and_leaves_status_failed(tmp_path, change):
    """Really other images are still refused, also when staged to a new path; the refusal is written to the
    run's status.json (``failed`` and the error), so a requeue loop that requeues ``interrupted`` runs stops."""
    run = interrupted_run(_DATA[0], tmp_path)
    staged = stage(_DATA[0], tmp_path / "job-2" / "data", "cp -r")
    if change == "rewritten_same_size":
        rewrite_same_size(first_image(staged))
        needle = "the same file names and sizes, other bytes"
    elif change == "file_added":
        shutil.copy(first_image(staged), first_image(staged).with_name("extra.jpg"))
        needle = "files added, removed"
    else:
        first_image(staged).unlink()
        needle = "files added, removed"
    rc, out, err = cli(*pretrain_args(staged, tmp_path / "logs", iters=4, batch_size=8), "--resume", run)
    line = one_error(rc, err, "training images changed", needle, "--allow_config_change")
    assert last_step(run) == 2
    got = status(run)
    assert got["status"] == "failed" and got["step"] == 2 and "training images changed" in got["error"], got
    assert line.removeprefix("error: ") in got["error"]
    rc, out, err = cli(*pretrain_args(staged, tmp_path / "logs", iters=4, batch_size=8), "--resume", run,
                       "--allow_config_change", "true")
    assert rc == 0, err
    assert last_step(run) == 4 and status(run)["status"] == "finished"


def test_a_refused_resume_of_a_finished_run_leaves_its_status_as_it_was(tmp_path):
    """Only an ``interrupted`` run (what a requeue loop restarts) is marked failed: a finished run resumed with a
    typo in its options stays ``finished``, byte for byte."""
    rc, _, err = cli(*pretrain_args(_DATA[0], tmp_path / "logs", iters=2, batch_size=8))
    assert rc == 0, err
    (run,) = [p for p in (tmp_path / "logs" / "t").iterdir() if p.is_dir()]
    before = (run / "status.json").read_bytes()
    rc, _, err = cli(*pretrain_args(_DATA[0], tmp_path / "logs", iters=2, batch_size=8, lr=0.1), "--resume", run)
    one_error(rc, err, "lr: 0.5 -> 0.1")
    assert (run / "status.json").read_bytes() == before


def test_a_resume_through_imagenet_path_on_a_staged_copy_trains_to_the_end(tmp_path, monkeypatch):
    """IMAGENET_PATH names the copy of this job (train/ and val/), another path than the first job's."""
    def imagenet_args():
        args = pretrain_args(Path("unused"), tmp_path / "logs", iters=4, batch_size=8)
        args[args.index("--data") + 1] = "imagenet"
        del args[args.index("--data_path"):args.index("--data_path") + 2]
        return args

    first = tmp_path / "node-a" / "imagenet"
    shutil.copytree(_DATA[0] / "train", first / "train")
    shutil.copytree(_DATA[0] / "test", first / "val")
    monkeypatch.setenv("IMAGENET_PATH", str(first))
    rc, out, err = cli(*imagenet_args(), "--stop_after", 2)
    assert rc == 0, err
    (run,) = [p for p in (tmp_path / "logs" / "t").iterdir() if p.is_dir()]
    monkeypatch.setenv("IMAGENET_PATH", str(stage(first, tmp_path / "node-b" / "imagenet", "cp -r")))
    rc, out, err = cli(*imagenet_args(), "--resume", run)
    assert rc == 0, err
    assert last_step(run) == 4


def _as_old_checkpoint(ck_path: Path, listing: str = "") -> None:
    """Rewrite a checkpoint as an earlier version saved it: a data_fingerprint of absolute paths and mtimes, and
    no content identity (``listing``: another listing, for a checkpoint of other images)."""
    ck = torch.load(ck_path, weights_only=False)
    ck["data_fingerprint"] = "0123456789abcdef"  # what no copy at another path reproduces
    del ck["data_content"]
    if listing:
        ck["data_listing"] = listing
    card = json.loads(ck_path.with_suffix(".json").read_text())
    ckpt_lib.save_checkpoint(ck_path, ck, {k: v for k, v in card.items() if k not in ("sha256", "file")})


def test_a_checkpoint_of_an_earlier_version_resumes_on_staged_data_by_names_and_sizes(tmp_path):
    """Checkpoints saved before content identities hold a fingerprint of absolute paths and mtimes, which any
    staged copy changes: their listing (names and sizes below the split) is compared instead, with a note."""
    run = interrupted_run(_DATA[0], tmp_path)
    _as_old_checkpoint(run / "checkpoints" / "checkpoint-00000002.pt")
    staged = stage(_DATA[0], tmp_path / "job-2" / "data", "cp -r")
    rc, out, err = cli(*pretrain_args(staged, tmp_path / "logs", iters=4, batch_size=8), "--resume", run)
    assert rc == 0, err
    assert "compared by names and sizes only" in (run / "log.txt").read_text() + out + err
    assert last_step(run) == 4


def test_a_checkpoint_of_an_earlier_version_on_other_files_is_refused(tmp_path):
    run = interrupted_run(_DATA[0], tmp_path)
    _as_old_checkpoint(run / "checkpoints" / "checkpoint-00000002.pt", listing="fedcba9876543210")
    rc, out, err = cli(*pretrain_args(_DATA[0], tmp_path / "logs", iters=4, batch_size=8), "--resume", run)
    one_error(rc, err, "training images changed", "files added, removed")
    assert status(run)["status"] == "failed"


# ---------------------------------------------------------------------------------------------------------------
# item 6: the caches are keyed by content and bounded
# ---------------------------------------------------------------------------------------------------------------
def _cifar_root(where: Path, data_root: Path, n: int = 3) -> Path:
    for split in ("train", "test"):
        for c in CLASSES[:2]:
            (where / "cifar10" / split / c).mkdir(parents=True)
            for f in sorted((data_root / "cifar10" / split / c).iterdir())[:n]:
                shutil.copy(f, where / "cifar10" / split / c / f.name)
    return where


def test_two_staged_copies_share_one_decoded_array_entry(tmp_path, monkeypatch, data_root):
    """Observation: each staged job decoded everything again and left one more array in ~/.cache/simclr. Now the
    second copy (another path, new mtimes) is served from the first one's entry: nothing is decoded."""
    from simclr.data import datasets
    monkeypatch.setenv("SIMCLR_CACHE", str(tmp_path / "cache"))
    first = _cifar_root(tmp_path / "job-1", data_root)
    a = get_dataset("cifar10", "train", root=first)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    second = stage(first, tmp_path / "job-2", "cp -r")
    decoded = []
    real = datasets._try_decode
    monkeypatch.setattr(datasets, "_try_decode", lambda p: decoded.append(p) or real(p))
    b = get_dataset("cifar10", "train", root=second)
    assert decoded == [] and len(list((tmp_path / "cache").glob("*.npz"))) == 1
    assert (b.images == a.images).all() and b.fingerprint == a.fingerprint


def test_two_staged_copies_share_one_feature_cache_entry(tmp_path, monkeypatch, trained_ckpt):
    monkeypatch.setenv("SIMCLR_CACHE", str(tmp_path / "cache"))
    hits = []
    for job in ("job-1", "job-2"):
        data = stage(_DATA[0], tmp_path / job / "data", "cp -r")
        rc, _, err = cli(*knn_args(data, tmp_path / "logs", trained_ckpt, name=job, cache_features="true"))
        assert rc == 0, err
        (run,) = (tmp_path / "logs" / job).iterdir()
        hits.append(json.loads((run / "eval.json").read_text())["feature_cache_hits"])
    assert hits == [0, 2]  # the second job reads both splits' features from the first one's entries
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 2


def test_the_cache_evicts_the_least_recently_used_entries_beyond_its_bound(tmp_path, monkeypatch, data_root):
    """Three datasets' arrays of the same size, a bound that holds two: writing the third removes the entry used
    longest ago. Reading the first in between makes the second the oldest."""
    monkeypatch.setenv("SIMCLR_CACHE", str(tmp_path / "cache"))
    roots = [_cifar_root(tmp_path / f"r{i}", data_root, n=3) for i in range(3)]
    for i, r in enumerate(roots):  # three different contents of one size: a different image in each
        victim = sorted((r / "cifar10" / "train" / CLASSES[0]).iterdir())[0]
        shutil.copy(sorted((data_root / "cifar10" / "train" / CLASSES[0]).iterdir())[10 + i], victim)
    entry = {}

    def load(i: int) -> None:
        ds = get_dataset("cifar10", "train", root=roots[i])
        (entry[i],) = (tmp_path / "cache").glob(f"cifar10-train-*{ds.fingerprint}.npz")
        assert entry[i].exists()

    load(0)
    size = entry[0].stat().st_size
    monkeypatch.setenv("SIMCLR_CACHE_MAX_GB", str(2.5 * size / 1e9))  # room for two entries, not three
    load(1)
    os.utime(entry[0], (1_000, 1_000))  # used long ago ...
    os.utime(entry[1], (2_000, 2_000))
    load(0)                              # ... and now again: entry 1 is the least recently used
    load(2)
    assert entry[0].exists() and entry[2].exists() and not entry[1].exists()
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == sorted([entry[0].name, entry[2].name])


def test_the_cache_bound_never_removes_files_the_package_did_not_write(tmp_path, monkeypatch, data_root):
    """SIMCLR_CACHE may name a folder holding other files: only the cache's own entries are evicted."""
    monkeypatch.setenv("SIMCLR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "notes-0123456789abcdeX.npz").write_bytes(b"x" * 10_000)
    (tmp_path / "cache" / "notes.txt").write_bytes(b"x" * 10_000)
    monkeypatch.setenv("SIMCLR_CACHE_MAX_GB", "1e-9")  # one byte: every older entry would go
    get_dataset("cifar10", "train", root=_cifar_root(tmp_path / "r", data_root))
    assert (tmp_path / "cache" / "notes.txt").exists() and (tmp_path / "cache" / "notes-0123456789abcdeX.npz").exists()
    assert len(list((tmp_path / "cache").glob("cifar10-train-*.npz"))) == 1  # the entry just written stays


def test_a_bad_cache_bound_is_one_line_before_any_work(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("SIMCLR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DATA_ROOT", str(_cifar_root(tmp_path / "r", data_root)))
    monkeypatch.setenv("SIMCLR_CACHE_MAX_GB", "ten")
    args = ["cifar10" if a == "folder" else a for a in pretrain_args(Path("unused"), tmp_path / "logs", iters=2)]
    del args[args.index("--data_path"):args.index("--data_path") + 2]
    rc, out, err = cli(*args)
    one_error(rc, err, "SIMCLR_CACHE_MAX_GB", "'ten'")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "logs").exists()


# ---------------------------------------------------------------------------------------------------------------
# item 3: nodes with their own copies (real processes: the point is two ranks)
# ---------------------------------------------------------------------------------------------------------------
def _two_ranks(tmp_path: Path, copies: list) -> list:
    """Two ranks of one 2-step run, rank r reading ``copies[r]`` by its own --data_path: [(exit code, stderr)]."""
    import socket
    import subprocess
    import sys
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1",
               SIMCLR_DIST_TIMEOUT="120", PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    procs = [subprocess.Popen([sys.executable, "-m", "simclr",
                               *pretrain_args(copy, tmp_path / "logs", iters=2, batch_size=8, node_rank=r)],
                              env=dict(env, RANK=str(r), LOCAL_RANK="0"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r, copy in enumerate(copies)]
    return [(p.returncode, err) for p, (_, err) in zip(procs, (p.communicate(timeout=300) for p in procs))]


def test_two_nodes_each_reading_its_own_copy_at_its_own_path_train_together(tmp_path):
    """Observation: with --data folder each node named its local copy by --data_path and the ranks refused
    ("processes disagree: data_path"). Now they compare the images' content and train."""
    copies = [stage(_DATA[0], tmp_path / "node-a" / "scratch", "cp -a"),
              stage(_DATA[0], tmp_path / "node-b" / "tmp" / "job-7", "cp -r")]
    results = _two_ranks(tmp_path, copies)
    assert all(rc == 0 for rc, _ in results), results
    (run,) = [p for p in (tmp_path / "logs" / "t").iterdir() if p.is_dir()]
    assert last_step(run) == 2 and status(run)["status"] == "finished"


def test_two_nodes_whose_copies_differ_in_content_refuse_naming_it(tmp_path):
    copies = [stage(_DATA[0], tmp_path / "node-a", "cp -a"), stage(_DATA[0], tmp_path / "node-b", "cp -a")]
    rewrite_same_size(first_image(copies[1]))
    for rc, err in _two_ranks(tmp_path, copies):
        line = one_error(rc, err, "disagree", "data_content")
        assert "data_path" not in line, line
    assert not list((tmp_path / "logs").rglob("checkpoint-*.pt"))


def test_the_bound_weighs_feature_entries_and_decoded_arrays_together(tmp_path, monkeypatch):
    """One bound over both kinds of entry: hand-made entries of known sizes and last uses, a bound of 2,500 bytes;
    after writing the newest, the oldest go until at most 2,500 bytes are left (here: two of them)."""
    from simclr.data.cache import bound_cache
    cache = tmp_path / "cache"
    (cache / "features").mkdir(parents=True)
    made = {"old_array": cache / f"cifar10-train-{'a' * 16}.npz", "old_features": cache / "features" / f"{'b' * 24}.pt",
            "recent_features": cache / "features" / f"{'c' * 24}.pt", "new_array": cache / f"stl10-test-{'d' * 16}.npz"}
    for used, path in enumerate(made.values()):
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1000 + used, 1000 + used))
    monkeypatch.setenv("SIMCLR_CACHE", str(cache))
    monkeypatch.setenv("SIMCLR_CACHE_MAX_GB", str(2500 / 1e9))
    removed = bound_cache(made["new_array"])
    assert sorted(removed) == sorted([made["old_array"], made["old_features"]])
    assert made["recent_features"].exists() and made["new_array"].exists()
