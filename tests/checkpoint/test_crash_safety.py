"""Reliability, in-process part: crash-safe checkpoint files, disk full, the divergence guard, safe
loading, and bad input found once the data is read as one ``error:`` line with exit code 2 and nothing written.

The subprocess fault injections (SIGKILL at random steps, SIGTERM, a corrupt newest checkpoint on
resume) live in tests/train/test_kill_and_resume.py.
"""
from __future__ import annotations

import ast
import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import REPO, tiny_args

from simclr import checkpoint as ckpt_lib
from simclr import cli
from simclr.errors import CheckpointError, UserError


def tiny_cifar_folder(root: Path, data_root: Path) -> Path:
    """64 training and 40 test images of the real CIFAR-10 copy as a --data folder dataset (4 classes):
    reading them costs nothing next to decoding all 60,000 images of the copy."""
    for split, n in (("train", 16), ("test", 10)):
        for c in ("airplane", "cat", "dog", "ship"):
            (root / split / c).mkdir(parents=True)
            for f in sorted((data_root / "cifar10" / split / c).iterdir())[:n]:
                shutil.copy(f, root / split / c / f.name)
    return root


_FOLDER: list = []


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a small, shared CPU OpenMP threads spin-waiting for each other made these
    tiny runs 8x slower (33 s instead of 4 s for 4 steps)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="module")
def _tiny_folder(data_root, tmp_path_factory):
    _FOLDER[:] = [tiny_cifar_folder(tmp_path_factory.mktemp("tiny-cifar"), data_root)]


def small(tmp_path: Path, **over) -> list:
    """The tiniest real run: 64 CIFAR-10 images, batch 16, ResNet-18 of width 8."""
    base = dict(data="folder", data_path=_FOLDER[0], image_size=32, train_subset=0, test_subset=0, batch_size=16,
                iters=4, knn_k=20)
    base.update(over)
    return tiny_args(tmp_path, **base)


def cli_run(capsys, *argv) -> tuple[int, str]:
    """``simclr ...`` in this process: (exit code, stderr). The exit code is what ``python -m simclr``
    passes to sys.exit."""
    rc = cli.main(["pretrain", *map(str, argv)])
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tree(path: Path) -> dict:
    """Every file under ``path`` with its content hash: to show that nothing was written or changed."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


# --------------------------------------------------------------------------------------------
# checkpoint files
# --------------------------------------------------------------------------------------------
def _payload(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"step": step, "model": {"w": torch.randn(64, 64, generator=g)}}


def test_save_is_atomic_and_checksummed(tmp_path):
    path = ckpt_lib.checkpoint_path(tmp_path, 3)
    digest = ckpt_lib.save_checkpoint(path, _payload(3), {"arch": "resnet18"})
    card = json.loads(path.with_suffix(".json").read_text())
    # the card's checksum is the file's (computed independently here), and loading verifies it
    assert card["sha256"] == digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["step"] == 3 and card["bytes"] == path.stat().st_size
    assert torch.equal(ckpt_lib.read(path)["model"]["w"], _payload(3)["model"]["w"])
    assert [p.name for p in path.parent.iterdir() if ".tmp" in p.name] == []
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        ckpt_lib.read(path)


def test_latest_valid_skips_truncated_and_corrupt(tmp_path, said):
    for s in (1, 2, 3, 4):
        ckpt_lib.save_checkpoint(ckpt_lib.checkpoint_path(tmp_path, s), _payload(s))
    p4, p3 = ckpt_lib.checkpoint_path(tmp_path, 4), ckpt_lib.checkpoint_path(tmp_path, 3)
    p4.write_bytes(p4.read_bytes()[: p4.stat().st_size // 2])  # truncated, as by a crash without atomic rename
    p3.with_suffix(".json").unlink()  # no card: the loader itself must notice the garbage
    p3.write_bytes(b"\x00" * 100)
    assert ckpt_lib.latest_valid(tmp_path) == ckpt_lib.checkpoint_path(tmp_path, 2)
    warnings = said(logging.WARNING)
    assert len(warnings) == 2 and "checkpoint-00000004" in warnings[0] and "checkpoint-00000003" in warnings[1]
    # every checkpoint broken: None, not an exception
    for s in (1, 2):
        ckpt_lib.checkpoint_path(tmp_path, s).write_bytes(b"junk")
    assert ckpt_lib.latest_valid(tmp_path) is None


def test_prune_keeps_last_and_removes_leftovers_of_a_killed_save(tmp_path):
    for s in range(1, 6):
        ckpt_lib.save_checkpoint(ckpt_lib.checkpoint_path(tmp_path, s), _payload(s))
    folder = tmp_path / "checkpoints"
    (folder / ".checkpoint-00000006.pt.tmp12345").write_bytes(b"partial")  # kill -9 during torch.save
    # killed between the card and the rename: the card a save writes first (its checksum, our format)
    (folder / "checkpoint-00000006.json").write_text(json.dumps(
        {"file": "checkpoint-00000006.pt", "sha256": "0" * 64, "step": 6, "format": ckpt_lib.FORMAT}))
    ckpt_lib.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint-00000004.json", "checkpoint-00000004.pt", "checkpoint-00000005.json", "checkpoint-00000005.pt"]


def _fill_disk_after(nbytes: int):
    """A torch.save that writes ``nbytes`` and then fails like a full disk."""
    def fake_save(obj, f, *a, **k):
        f.write(b"x" * nbytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return fake_save


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old = ckpt_lib.checkpoint_path(tmp_path, 1)
    ckpt_lib.save_checkpoint(old, _payload(1))
    before = tree(tmp_path)
    monkeypatch.setattr(torch, "save", _fill_disk_after(1000))
    with pytest.raises(UserError, match="disk full"):
        ckpt_lib.save_checkpoint(ckpt_lib.checkpoint_path(tmp_path, 2), _payload(2))
    # also when the checkpoint being rewritten is the same file
    with pytest.raises(UserError, match="disk full"):
        ckpt_lib.save_checkpoint(old, _payload(1))
    assert tree(tmp_path) == before  # no temp file, no card, old bytes untouched
    monkeypatch.undo()
    assert torch.equal(ckpt_lib.read(old)["model"]["w"], _payload(1)["model"]["w"])


def test_disk_full_in_training_is_one_error_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def save_then_fill(obj, f, *a, **k):
        calls.append(obj.get("step") if isinstance(obj, dict) else None)
        if len(calls) == 1:
            return real_save(obj, f, *a, **k)
        return _fill_disk_after(4096)(obj, f)

    monkeypatch.setattr(torch, "save", save_then_fill)
    rc, err = cli_run(capsys, *small(tmp_path, iters=4, save_freq=2, run_dir=tmp_path / "run"))
    assert_one_line_error(rc, err, "disk full", "previous checkpoints are intact")
    monkeypatch.undo()
    assert calls == [2, 4]
    run = tmp_path / "run"
    assert json.loads((run / "status.json").read_text())["status"] == "failed"
    assert [p.name for p in (run / "checkpoints").iterdir()] in (
        ["checkpoint-00000002.pt", "checkpoint-00000002.json"], ["checkpoint-00000002.json", "checkpoint-00000002.pt"])
    assert ckpt_lib.latest_valid(run) == ckpt_lib.checkpoint_path(run, 2)


# --------------------------------------------------------------------------------------------
# divergence guard
# --------------------------------------------------------------------------------------------
def nan_at_step(monkeypatch, bad_step: int) -> None:
    """Fault injection: the loss (and so every gradient) of optimizer step ``bad_step`` becomes NaN."""
    from simclr import loss as loss_lib  # the step's criterion calls simclr.loss.nt_xent
    real = loss_lib.nt_xent

    def loss(z, temperature, multiplier):
        value, acc = real(z, temperature, multiplier)
        return (value * float("nan") if calls.pop(0) == bad_step else value), acc

    calls = list(range(1000))
    monkeypatch.setattr(loss_lib, "nt_xent", loss)


def test_nan_stops_with_failed_status_and_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    nan_at_step(monkeypatch, 2)
    rc, err = cli_run(capsys, *small(tmp_path, iters=6, save_freq=1, keep_last=10, run_dir=run))
    assert_one_line_error(rc, err, "non-finite", "step 2", "--on_nan skip")
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and status["step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == [
        "checkpoint-00000001.pt", "checkpoint-00000002.pt"]
    assert ckpt_lib.latest_valid(run) == ckpt_lib.checkpoint_path(run, 2)  # checksum still matches
    events = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 2, "event": "nan", "action": "stop"} in events
    assert "non-finite loss or gradient at step 2" in (run / "log.txt").read_text()


def test_nan_skip_leaves_weights_and_bn_stats_untouched_and_counts(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    nan_at_step(monkeypatch, 2)
    rc, err = cli_run(capsys, *small(tmp_path, iters=4, save_freq=1, keep_last=10, on_nan="skip",
                                     run_dir=run))
    assert rc == 0, err
    load = lambda s: ckpt_lib.read(ckpt_lib.checkpoint_path(run, s))  # noqa: E731
    c2, c3, c4 = load(2), load(3), load(4)
    # the skipped step (index 2, between checkpoints 2 and 3) changed nothing: weights, BN running
    # statistics (updated by its forward pass, then restored) and optimizer momentum
    assert c2["model"].keys() == c3["model"].keys()
    for k in c2["model"]:
        assert torch.equal(c2["model"][k], c3["model"][k]), k
    for a, b in zip(c2["optimizer"]["state"].values(), c3["optimizer"]["state"].values()):
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
    assert any(not torch.equal(c3["model"][k], c4["model"][k]) for k in c3["model"])  # the next step trains
    assert (c2["nan_skips"], c3["nan_skips"], c4["nan_skips"]) == (0, 1, 1)
    assert all(torch.isfinite(v).all() for v in c4["model"].values() if v.is_floating_point())
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 2, "event": "nan", "action": "skip"} in recs
    assert [r["nan_skips"] for r in recs if "loss" in r] == [0, 0, 1, 1]
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


# --------------------------------------------------------------------------------------------
# bad input: one line, exit code 2, nothing written
# --------------------------------------------------------------------------------------------
BAD_VALUES = [  # found once the data is read or the device looked at (the config's own errors: test_config_parser)
    ({"batch_size": 128}, ["batch_size 128 is larger than the dataset (64 images)"]),
    ({"device": "cuda"}, ["CUDA is not available"]),
]


@pytest.mark.parametrize("over,needles", BAD_VALUES, ids=[next(iter(o)) + "=" + str(next(iter(o.values())))
                                                          for o, _ in BAD_VALUES])
def test_bad_value_is_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, over, needles):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also true on a GPU machine
    rc, err = cli_run(capsys, *small(tmp_path, **over))
    assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "logs").exists()


def _image_folder(root: Path, data_root: Path, per_class: int = 12) -> Path:
    """A --data folder dataset: two classes of real CIFAR-10 JPEGs, train/ and test/."""
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for f in sorted((data_root / "cifar10" / split / c).iterdir())[:per_class]:
                shutil.copy(f, d / f.name)
    return root


def test_missing_and_empty_dataset_folder(tmp_path, capsys):
    rc, err = cli_run(capsys, *small(tmp_path, data="folder", data_path=tmp_path / "nowhere"))
    assert_one_line_error(rc, err, "the train split of --data_path not found", str(tmp_path / "nowhere" / "train"))
    for split in ("train", "test"):
        (tmp_path / "empty" / split / "cat").mkdir(parents=True)
    rc, err = cli_run(capsys, *small(tmp_path, data="folder", data_path=tmp_path / "empty"))
    assert_one_line_error(rc, err, "holds no images")
    rc, err = cli_run(capsys, *small(tmp_path, data="folder", data_path=""))  # data_path forgotten
    assert_one_line_error(rc, err, "--data_path")
    assert not (tmp_path / "logs").exists()


def test_corrupt_image_fails_naming_it_or_is_skipped_and_counted(tmp_path, capsys, data_root):
    folder = _image_folder(tmp_path / "imgs", data_root)
    bad = folder / "train" / "dog" / "zz-broken.jpg"
    bad.write_text("this is not a JPEG")
    args = small(tmp_path, data="folder", data_path=folder, image_size=32, train_subset=0, test_subset=0,
                 batch_size=8, iters=2)
    rc, err = cli_run(capsys, *args)
    assert_one_line_error(rc, err, "cannot read image", str(bad), "--skip_bad_images")
    assert not (tmp_path / "logs").exists()

    run = tmp_path / "run"
    rc, err = cli_run(capsys, *args, "--skip_bad_images", "true", "--run_dir", run)
    assert rc == 0, err
    assert "skipped 1 unreadable image" in (run / "log.txt").read_text()
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "loss" in ln]
    assert recs and all(r["skipped_images"] == 1 for r in recs)
    assert json.loads((run / "status.json").read_text())["metrics"]["skipped_images"] == 1


def test_corrupt_image_in_cifar_folder_copy(tmp_path, capsys, data_root, monkeypatch):
    """The CIFAR path decodes a whole folder into memory: a broken file there is named too."""
    root = tmp_path / "data"
    _image_folder(root / "cifar10", data_root, per_class=40)
    (root / "cifar10" / "train" / "cat" / "0000-bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    monkeypatch.setenv("DATA_ROOT", str(root))
    monkeypatch.setenv("SIMCLR_CACHE", str(tmp_path / "cache"))
    rc, err = cli_run(capsys, *small(tmp_path, data="cifar10", data_path="", image_size=0))
    assert_one_line_error(rc, err, "0000-bad.jpg", "--skip_bad_images")
    rc, err = cli_run(capsys, *small(tmp_path, data="cifar10", data_path="", image_size=0, iters=1,
                                     skip_bad_images="true", run_dir=tmp_path / "run"))
    assert rc == 0, err
    assert "skipped 1 unreadable image" in (tmp_path / "run" / "log.txt").read_text()


def test_checkpoint_of_other_architecture_and_junk_file(tmp_path, capsys):
    run = tmp_path / "run"
    rc, err = cli_run(capsys, *small(tmp_path, iters=1, run_dir=run))
    assert rc == 0, err
    before = tree(run)
    ck = ckpt_lib.checkpoint_path(run, 1)
    rc, err = cli_run(capsys, *small(tmp_path, iters=2, width=16, ckpt=ck))
    assert_one_line_error(rc, err, "width=8", "--width 8")
    rc, err = cli_run(capsys, *small(tmp_path, iters=2, arch="resnet34", ckpt=ck))
    assert_one_line_error(rc, err, "arch='resnet18'")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(12).bytes(2000))
    rc, err = cli_run(capsys, *small(tmp_path, iters=2, ckpt=junk))
    assert_one_line_error(rc, err, "not a readable checkpoint")
    rc, err = cli_run(capsys, *small(tmp_path, iters=2, ckpt=tmp_path / "missing.pt"))
    assert_one_line_error(rc, err, "checkpoint not found")
    assert tree(run) == before  # the run folder the checkpoint lives in is untouched
    assert not (tmp_path / "logs").exists()


def test_output_folder_not_writable(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc, err = cli_run(capsys, *small(tmp_path, root=blocker))
    assert_one_line_error(rc, err, "cannot write the run folder", "--root")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        rc, err = cli_run(capsys, *small(tmp_path, root=ro))
        assert_one_line_error(rc, err, "cannot write the run folder")
        assert list(ro.iterdir()) == []


def test_resume_takes_a_run_folder_or_auto(tmp_path, capsys):
    rc, err = cli_run(capsys, *small(tmp_path, resume="yes"))
    assert_one_line_error(rc, err, "--resume takes a run folder or 'auto'")
    assert not (tmp_path / "logs").exists()
    # auto with no earlier run of this name: a fresh start
    rc, err = cli_run(capsys, *small(tmp_path, resume="auto", iters=1))
    assert rc == 0, err
    assert len(list((tmp_path / "logs" / "t").iterdir())) == 1


# --------------------------------------------------------------------------------------------
# requirement 7: nothing unpickles arbitrary code without the user's explicit flag
# --------------------------------------------------------------------------------------------
def unsafe_loads(source: str) -> list:
    """Line numbers of ``torch.load`` calls not provably safe: weights_only missing or not literally True,
    unless the call sits inside an ``if`` whose test names a ``trust`` flag. Also ``pickle.load(s)`` and
    ``np.load(..., allow_pickle=True)``."""
    tree_ = ast.parse(source)
    parents = {child: node for node in ast.walk(tree_) for child in ast.iter_child_nodes(node)}

    def guarded(node) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.If, ast.IfExp)) and "trust" in ast.unparse(node.test):
                return True
        return False

    bad = []
    for node in ast.walk(tree_):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        if name.endswith("torch.load") or name == "load" and "weights_only" in kw:
            v = kw.get("weights_only")
            safe = isinstance(v, ast.Constant) and v.value is True
            if not safe and not guarded(node):
                bad.append(node.lineno)
        elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
            bad.append(node.lineno)
        elif name.endswith("np.load") or name.endswith("numpy.load"):
            v = kw.get("allow_pickle")
            if v is not None and not (isinstance(v, ast.Constant) and v.value is False) and not guarded(node):
                bad.append(node.lineno)
    return bad


def test_unsafe_load_checker_catches_what_it_should():
    assert unsafe_loads("import torch\ntorch.load(p, weights_only=False)\n") == [2]
    assert unsafe_loads("torch.load(p)\n") == [1]
    assert unsafe_loads("import pickle\npickle.load(f)\n") == [2]
    guarded = "if trust:\n    torch.load(p, weights_only=False)\nelse:\n    torch.load(p, weights_only=True)\n"
    assert unsafe_loads(guarded) == []
    assert unsafe_loads("if x:\n    torch.load(p, weights_only=False)\n") == [2]


def test_no_unpickling_without_the_trust_flag():
    sources = sorted((REPO / "src" / "simclr").rglob("*.py"))
    assert len(sources) > 10
    found = {str(p.relative_to(REPO)): unsafe_loads(p.read_text()) for p in sources}
    assert {k: v for k, v in found.items() if v} == {}
    # that no entry point reaches the guarded full unpickling without the flag is tested by behaviour:
    # tests/checkpoint/test_hostile_files.py feeds pickles that run code through every public loading entry point


def test_resume_takes_the_checkpoints_seed_when_none_was_given(tmp_path, capsys):
    """Data order and augmentations are functions of (seed, step); the default --seed -1 draws a new seed
    at every start, so a resumed run must continue with the seed its checkpoint was trained with."""
    from simclr import config as config_lib
    from simclr.data.loaders import build_loader
    from simclr.options import PretrainConfig
    from simclr.train import setup

    run = tmp_path / "run"
    rc, err = cli_run(capsys, *small(tmp_path, iters=3, stop_after=1, seed=123, run_dir=run))
    assert rc == 0, err
    cfg, _ = config_lib.parse(PretrainConfig, small(tmp_path, iters=3, seed=-1, resume="auto", run_dir=run))
    tr = setup(cfg)
    tr.run.close()
    assert (tr.step, tr.cfg.seed) == (1, 123)
    assert "seed: 123" in (run / "config.yaml").read_text()
    # the loader it trains from draws what a loader built with seed 123 draws (images and augmentations)
    ref_cfg, _ = config_lib.parse(PretrainConfig, small(tmp_path, seed=123))
    (xa, ya), = tr.parts.loader.batches(1, 2)
    (xb, yb), = build_loader(ref_cfg, tr.images, torch.device("cpu")).batches(1, 2)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # an explicit, different seed changes the run: refused, or obeyed with a warning when allowed
    with pytest.raises(UserError, match=r"seed: 123 -> 7.*--allow_config_change true"):
        setup(config_lib.parse(PretrainConfig, small(tmp_path, iters=3, seed=7, resume="auto", run_dir=run))[0])
    cfg, _ = config_lib.parse(PretrainConfig, small(tmp_path, iters=3, seed=7, resume="auto", run_dir=run,
                                                    allow_config_change="true"))
    tr = setup(cfg)
    tr.run.close()
    assert tr.cfg.seed == 7 and "trained with seed=123" in capsys.readouterr().err
