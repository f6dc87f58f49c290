"""Data identity, replayed on real files: the folder walk does not follow directory links back into the tree,
and train and test class lists must match wherever labels meet (the pretraining kNN monitor included)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.folder_runs import CLASSES, cli, knn_args, one_error, pretrain_args, tiny_data_setup
from simclr.data import datasets, get_dataset

_DATA: list = []


_setup = tiny_data_setup(_DATA, n_train=4, n_test=3)


def copy_data(tmp_path: Path) -> Path:
    return Path(shutil.copytree(_DATA[0], tmp_path / "data", symlinks=True))


def class_counts(ds) -> dict:
    """{class name: images}, counted by a plain loop over the targets."""
    out: dict = {}
    for t in ds.targets:
        out[ds.classes[t]] = out.get(ds.classes[t], 0) + 1
    return out


def test_a_symlink_loop_in_a_class_folder_does_not_multiply_the_class(tmp_path):
    """Observation: a link from a class folder back to itself repeated the class 41 times (once per link level
    the OS resolves) without a word."""
    data = copy_data(tmp_path)
    os.symlink(".", data / "train" / "cat" / "again")            # back into the same folder
    os.symlink("../..", data / "train" / "dog" / "whole_split")  # out of the class, back into the tree
    ds = get_dataset("folder", "train", str(data), 32)
    assert class_counts(ds) == {c: 4 for c in CLASSES}
    assert len({str(f) for f in ds.files}) == len(ds.files) == 16


def test_two_symlink_loops_do_not_make_the_scan_exponential(tmp_path, monkeypatch):
    """Observation: two links back into a class folder made the scan exponential (2**40 folder reads). The
    folders read are counted (not timed): the scan must read each real folder once, about 10 here."""
    data = copy_data(tmp_path)
    for name in ("l1", "l2"):
        os.symlink(".", data / "train" / "ship" / name)
    reads = []
    real = os.scandir

    def counting(path="."):
        reads.append(path)
        if len(reads) > 1000:
            raise RuntimeError(f"the scan read more than 1000 folders: {reads[-3:]}")
        return real(path)

    monkeypatch.setattr(os, "scandir", counting)
    files, targets, classes, _ = datasets.scan_folder(data / "train")
    monkeypatch.undo()
    assert len(files) == 16 and [targets.count(i) for i in range(4)] == [4, 4, 4, 4]
    assert len(reads) <= 10


def test_a_symlinked_image_file_and_a_symlinked_class_folder_are_still_read(tmp_path):
    """Chosen behaviour: a link to a regular image file is read (datasets made of links to one copy), and a
    class folder that is itself a link (a subset of classes made of links) is a class; only links to folders
    inside a class folder are not followed."""
    data = copy_data(tmp_path)
    shutil.move(str(data / "train" / "cat"), str(tmp_path / "cat_elsewhere"))
    os.symlink(tmp_path / "cat_elsewhere", data / "train" / "cat")
    one = sorted((data / "train" / "dog").iterdir())[0]
    os.symlink(one, data / "train" / "dog" / "linked.png")
    ds = get_dataset("folder", "train", str(data), 32)
    assert class_counts(ds) == {"airplane": 4, "cat": 4, "dog": 5, "ship": 4}


def test_pretraining_knn_monitor_refuses_a_test_split_lacking_a_class(tmp_path):
    """Observation: `simclr knn` refused a test split lacking one class, but pretraining's kNN monitor scored
    test labels against shifted training labels and logged that as the run's accuracy."""
    data = copy_data(tmp_path)
    shutil.rmtree(data / "test" / "cat")
    rc, out, err = cli(*pretrain_args(data, tmp_path / "logs", iters=1, eval_at_start="true", knn_k=4))
    line = one_error(rc, err, "classes differ", "cat")
    assert "kNN top-1" not in out + err, line
    assert not (tmp_path / "logs").exists()  # refused in the set-up, before any run folder


@pytest.mark.parametrize("command", ["pretrain", "knn"])
def test_an_empty_test_split_is_refused_before_any_run_folder(tmp_path, trained_ckpt, command):
    """Observation: pretraining found an empty test split (class folders, no images) only at its kNN monitor,
    after the run folder was made (nothing should be written). Now both commands refuse it before any folder."""
    data = copy_data(tmp_path)
    for f in [p for p in (data / "test").rglob("*") if p.is_file()]:
        f.unlink()
    args = pretrain_args(data, tmp_path / "logs", iters=2) if command == "pretrain" else \
        knn_args(data, tmp_path / "logs", trained_ckpt)
    rc, out, err = cli(*args)
    one_error(rc, err, f"{data / 'test'} holds no images")
    assert not (tmp_path / "logs").exists()


def test_images_overwritten_in_place_are_read_again_not_served_from_the_cache(tmp_path, monkeypatch, data_root):
    """Observation: the decoded-image cache was keyed by the file list and the split folder's mtime, so images
    rewritten in place (same names, new pixels) were trained and evaluated on their OLD pixels."""
    import numpy as np
    from PIL import Image

    monkeypatch.setenv("SIMCLR_CACHE", str(tmp_path / "cache"))
    split = tmp_path / "root" / "cifar10" / "train"
    for c in CLASSES[:2]:
        (split / c).mkdir(parents=True)
        for f in sorted((data_root / "cifar10" / "train" / c).iterdir())[:3]:
            shutil.copy(f, split / c / f.name)
    first = get_dataset("cifar10", "train", root=tmp_path / "root").images.copy()
    assert list((tmp_path / "cache").rglob("*.npz")), "the first read must fill the cache"
    victim = sorted((split / CLASSES[0]).iterdir())[0]
    folder_mtime = split.stat().st_mtime_ns
    Image.fromarray(255 - np.asarray(Image.open(victim).convert("RGB"))).save(victim, format="PNG")
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    os.utime(split, ns=(folder_mtime, folder_mtime))  # the folder itself looks unchanged, as on most filesystems
    again = get_dataset("cifar10", "train", root=tmp_path / "root").images
    expected = np.asarray(Image.open(victim).convert("RGB"))
    assert (again[0] == expected).all() and not (first[0] == expected).all()
    assert (again[1:] == first[1:]).all()


def _one_run(data: Path, tmp_path: Path, **over) -> Path:
    rc, out, err = cli(*pretrain_args(data, tmp_path / "logs", **over))
    assert rc == 0, err
    (run,) = [p for p in (tmp_path / "logs" / "t").iterdir() if p.is_dir()]
    return run


def _rewrite(image: Path) -> None:
    """New pixels under the same name, with a later mtime."""
    import numpy as np
    from PIL import Image
    Image.fromarray(255 - np.asarray(Image.open(image).convert("RGB"))).save(image, format="PNG")
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))


@pytest.mark.parametrize("change", ["class_folder_vanished", "image_rewritten_in_place"])
def test_a_resume_on_other_images_is_refused_unless_allowed(tmp_path, change):
    """Observation: a resume after a class folder vanished (or images were rewritten) continued on other images,
    another trajectory, without a word. Now one line; --allow_config_change continues with a warning."""
    data = copy_data(tmp_path)
    run = _one_run(data, tmp_path, iters=4, stop_after=2, batch_size=8)
    if change == "class_folder_vanished":
        shutil.rmtree(data / "train" / "ship")
        shutil.rmtree(data / "test" / "ship")  # from both: the monitor's class lists still match
    else:
        _rewrite(sorted((data / "train" / "cat").iterdir())[0])
    args = pretrain_args(data, tmp_path / "logs", iters=4, batch_size=8)
    rc, out, err = cli(*args, "--resume", run)
    one_error(rc, err, "training images changed", "--allow_config_change")
    assert max(p.name for p in (run / "checkpoints").glob("checkpoint-*.pt")) == "checkpoint-00000002.pt"
    rc, out, err = cli(*args, "--resume", run, "--allow_config_change", "true")
    assert rc == 0, err
    assert "training images changed" in err + out


def test_two_processes_with_different_lr_and_width_refuse_naming_the_keys_on_every_rank(tmp_path):
    """Observations: two processes with different --lr (a typo on one node) trained "successfully" and config.yaml
    recorded rank 0's value; with different --width rank 1 died in a DDP traceback. Real processes (the point is
    two ranks): each says which keys differ, before any model is built; nothing runs."""
    import socket
    import subprocess
    import sys
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1",
               SIMCLR_DIST_TIMEOUT="120")
    procs = [subprocess.Popen([sys.executable, "-m", "simclr",
                               *pretrain_args(_DATA[0], tmp_path / "logs", lr=lr, width=width)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r, lr, width in ((0, 0.5, 8), (1, 0.05, 16))]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        line = one_error(p.returncode, err, "disagree", "lr: rank 0 0.5, rank 1 0.05", "width: rank 0 8, rank 1 16")
        assert "temperature" not in line and "DistributedDataParallel" not in err, line
    assert not list((tmp_path / "logs").rglob("checkpoint-*.pt"))


@pytest.mark.slow  # a real process or a long wait: `make test` runs it, `make test-fast` leaves it out
def test_a_master_port_that_never_answers_fails_within_the_timeout_with_one_line(tmp_path):
    """Observation: a MASTER_PORT where another TCP service listens blocked the rendezvous forever
    (SIMCLR_DIST_TIMEOUT not applied). A real process: the hang is the point; 120 s bounds the test, not asserted."""
    import socket
    import subprocess
    import sys
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # accepts connections, never says a word
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(silent.getsockname()[1]), WORLD_SIZE="2", RANK="1",
                   LOCAL_RANK="1", SIMCLR_DIST_TIMEOUT="3", OMP_NUM_THREADS="1")
        try:
            r = subprocess.run([sys.executable, "-m", "simclr", *pretrain_args(_DATA[0], tmp_path / "logs")],
                               env=env, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the rendezvous with a silent MASTER_PORT did not give up")
    one_error(r.returncode, r.stderr, "could not join the process group", "within 3 s", "no answer")
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("change", ["image_rewritten_in_place", "data_copied"])
def test_a_cifar_resume_on_other_images_is_refused_on_a_copy_it_goes_on(tmp_path, monkeypatch, change):
    """CIFAR (an array dataset under DATA_ROOT) carries a fingerprint in its checkpoints as folders do: a resume
    on rewritten images is refused; a copy of the same images (new mtimes, another DATA_ROOT: data staged for a
    requeued job) is the same data, and the run goes on."""
    root = tmp_path / "root"
    shutil.copytree(_DATA[0], root / "cifar10")
    monkeypatch.setenv("DATA_ROOT", str(root))
    folder_args = pretrain_args(Path("unused"), tmp_path / "logs", iters=4, batch_size=8)
    args = ["cifar10" if a == "folder" else a for a in folder_args]  # --data cifar10 ...
    del args[args.index("--data_path"):args.index("--data_path") + 2]  # ... read from DATA_ROOT
    rc, out, err = cli(*args, "--stop_after", 2)
    assert rc == 0, err
    (run,) = [p for p in (tmp_path / "logs" / "t").iterdir() if p.is_dir()]
    assert torch.load(run / "checkpoints" / "checkpoint-00000002.pt", weights_only=False)["data_content"]
    if change == "data_copied":
        shutil.copytree(root, tmp_path / "copy")  # copytree keeps mtimes: touch every file, as a plain cp does
        for f in (p for p in (tmp_path / "copy").rglob("*") if p.is_file()):
            os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10 ** 9))
        monkeypatch.setenv("DATA_ROOT", str(tmp_path / "copy"))
        rc, out, err = cli(*args, "--resume", run)
        assert rc == 0, err
        assert "changed" not in err
        assert max(p.name for p in (run / "checkpoints").glob("*.pt")) == "checkpoint-00000004.pt"
        return
    _rewrite(sorted((root / "cifar10" / "train" / "cat").iterdir())[0])
    rc, out, err = cli(*args, "--resume", run)
    one_error(rc, err, "training images changed", "removed, renamed, or rewritten", "--allow_config_change")
    rc, out, err = cli(*args, "--resume", run, "--allow_config_change", "true")
    assert rc == 0, err


def test_stl10_pretraining_images_carry_a_fingerprint_of_all_their_parts(tmp_path):
    """STL-10's pretraining split is train + unlabeled: rewriting an unlabeled image changes its fingerprint;
    a copy elsewhere (new paths, new mtimes) keeps it, and its listing."""
    stl = tmp_path / "root" / "stl10"
    shutil.copytree(_DATA[0] / "train", stl / "train")
    shutil.copytree(_DATA[0] / "test", stl / "test")
    (stl / "unlabeled").mkdir()
    for i, f in enumerate(sorted((_DATA[0] / "train" / "cat").iterdir())):
        shutil.copy(f, stl / "unlabeled" / f"u{i}{f.suffix}")
    first = get_dataset("stl10", "pretrain", root=tmp_path / "root")
    assert first.fingerprint and first.listing and len(first) == 4 * 4 + 4
    shutil.copytree(tmp_path / "root", tmp_path / "copy")
    for f in (p for p in (tmp_path / "copy").rglob("*") if p.is_file()):
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10 ** 9))
    copy = get_dataset("stl10", "pretrain", root=tmp_path / "copy")
    assert copy.listing == first.listing and copy.fingerprint == first.fingerprint
    _rewrite(stl / "unlabeled" / sorted(os.listdir(stl / "unlabeled"))[0])
    assert get_dataset("stl10", "pretrain", root=tmp_path / "root").fingerprint != first.fingerprint


def test_an_evaluation_records_the_identity_of_the_files_it_read(tmp_path, trained_ckpt):
    """Every run records its data's fingerprint: an evaluation's env.json and eval.json say which files (paths
    below the split, sizes, content) each split was, so two results can be told apart by the data they saw."""
    data = copy_data(tmp_path)

    def recorded(name: str) -> dict:
        rc, _, err = cli(*knn_args(data, tmp_path / "logs", trained_ckpt, name=name))
        assert rc == 0, err
        (run,) = (tmp_path / "logs" / name).iterdir()
        env = json.loads((run / "env.json").read_text())["data_fingerprint"]
        assert json.loads((run / "eval.json").read_text())["data"]["fingerprint"] == env
        return env

    first = recorded("a")
    assert all(isinstance(first[s], str) and len(first[s]) == 16 for s in ("train", "test")), first
    image = sorted((data / "test" / CLASSES[0]).iterdir())[0]
    image.write_bytes(image.read_bytes() + b"\0")  # one test image rewritten in place
    second = recorded("b")
    assert second["train"] == first["train"] and second["test"] != first["test"]
