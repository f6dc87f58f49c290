"""Helpers of the tests that run the CLI on tiny runs: a tiny real-image dataset, tiny runs, the CLI run in this
process, and the one `error:` line of a refused command."""
from __future__ import annotations

import hashlib
import io
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from simclr.cli import main

CLASSES = ("airplane", "cat", "dog", "ship")


def tiny_folder(root: Path, data_root: Path, n_train: int = 16, n_test: int = 10) -> Path:
    """``n_train``/``n_test`` real CIFAR-10 images per class (4 classes) as a --data folder dataset."""
    for split, n in (("train", n_train), ("test", n_test)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for f in sorted((data_root / "cifar10" / split / c).iterdir())[:n]:
                shutil.copy(f, root / split / c / f.name)
    return root


def cli(*args) -> tuple[int, str, str]:
    """``simclr ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def pretrain_args(data: Path, root: Path, **over) -> list:
    """A 4-step pretraining run of a width-8 ResNet-18 on ``data`` (a tiny_folder), on the CPU."""
    base = dict(data="folder", data_path=data, image_size=32, arch="resnet18", width=8, batch_size=16, iters=4,
                lr=0.5, warmup=0.25, log_freq=1, eval_freq=0, save_freq=1, keep_last=2, workers=0, seed=0,
                device="cpu", root=root, name="t", verbose="false", temperature=0.5, train_subset=0,
                test_subset=0, knn_k=20)
    base.update(over)
    out = ["pretrain"]
    for k, v in base.items():
        out += [f"--{k}", str(v)]
    return out


def knn_args(data: Path, root: Path, encoder, **over) -> list:
    base = dict(data="folder", data_path=data, image_size=32, encoder_ckpt=encoder, k=20, device="cpu", workers=0,
                root=root, name="t", verbose="false", cache_features="false")
    base.update(over)
    out = ["knn"]
    for k, v in base.items():
        out += [f"--{k}", str(v)]
    return out


def one_error(rc: int, err: str, *needles: str) -> str:
    """The single ``error:`` line of a refused command (exit code 2, no traceback), holding every needle."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def tree_digest(folder: Path) -> dict:
    """{relative path: sha256} of every file under ``folder`` (links not followed): to prove nothing changed."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_error_line(r) -> str:
    """The one `error:` line of a failed command (a hint how to continue may follow it)."""
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-2000:]
    return errors[0]


def tiny_data_setup(data: list, **sizes):
    """A module's set-up, as an autouse fixture to assign at its top level (``_setup = tiny_data_setup(_DATA)``):
    ``data[0]`` is a tiny image folder of real CIFAR-10 images, and torch runs on 1 thread while the module's tests
    run (their bit-exact comparisons are made at that count). ``sizes``: :func:`tiny_folder`'s ``n_train`` and
    ``n_test``."""
    @pytest.fixture(autouse=True, scope="module")
    def _setup(data_root, tmp_path_factory):
        data[:] = [tiny_folder(tmp_path_factory.mktemp("tiny"), data_root, **sizes)]
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(n)
    return _setup


def one_run(data: Path, tmp_path: Path, **over) -> Path:
    """The run folder of a finished ``pretrain_args(data, tmp_path / "logs", **over)``."""
    rc, out, err = cli(*pretrain_args(data, tmp_path / "logs", **over))
    assert rc == 0, err
    (status,) = (tmp_path / "logs").rglob("status.json")
    return status.parent
