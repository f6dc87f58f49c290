"""Shared test fixtures. Real data comes from DATA_ROOT (../shared/data next to the clone).

``run_cli`` runs ``simclr ...`` through ``simclr.cli.main`` in this interpreter (no torch import per call);
``run_cli(..., subprocess=True)`` is a real ``python -m simclr`` process, for the tests where the process is
the point (signals, locks, kill -9, torchrun, a closed pipe). ``trained_run`` and ``interrupted_run`` are
fresh copies of one tiny run trained once per session.
"""
from __future__ import annotations

import io
import logging
import os
import random
import runpy
import shutil
import signal
import subprocess as _subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if not os.environ.get("DATA_ROOT"):
    os.environ["DATA_ROOT"] = str((REPO.parent / "shared" / "data").resolve())
os.environ.setdefault("SIMCLR_CACHE", str(REPO / ".cache" / "simclr"))
# The suite's exact comparisons across code paths (processes, resume, exports) are written for the spec's fp32
# NCHW path: native bf16 is forced off here (subprocesses inherit it); tests/runtime/test_precision_and_layout.py
# turns the detection on and off explicitly.
os.environ["SIMCLR_CPU_BF16"] = "0"
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def said(caplog):
    """What the project said (its messages are ``logging`` records of the ``simclr`` logger, simclr.messages):
    ``said()`` every message so far, ``said(logging.WARNING)`` the warnings only."""
    caplog.set_level(logging.INFO, logger="simclr")
    return lambda level=logging.INFO: [r.getMessage() for r in caplog.records
                                       if r.name.startswith("simclr") and r.levelno >= level]


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ["DATA_ROOT"])
    if not (root / "cifar10" / "train").is_dir():
        pytest.fail(f"real CIFAR-10 not found under DATA_ROOT={root}; set DATA_ROOT=../shared/data")
    return root


@pytest.fixture(autouse=True, scope="session")
def _shared_data_decoded_once():
    """Each folder of the shared, read-only DATA_ROOT is scanned and decoded once per session, not once per
    in-process run (listing CIFAR-10's 50,000 files and loading its cached array takes seconds each time).
    Folders anywhere else (the tests' own, changed on purpose) go through ``folder_to_array`` every time."""
    from simclr.data import datasets
    real, shared, memo = datasets.folder_to_array, Path(os.environ["DATA_ROOT"]).resolve(), {}

    def once(root, name, skip_bad_images=False):
        where = Path(root).resolve()
        if not where.is_relative_to(shared):
            return real(root, name, skip_bad_images)
        key = (where, name, skip_bad_images)
        if key not in memo:
            memo[key] = real(root, name, skip_bad_images)
        got = memo[key]
        return got._replace(targets=list(got.targets), classes=list(got.classes), bad=list(got.bad))

    datasets.folder_to_array = once
    yield
    datasets.folder_to_array = real


def tiny_args(tmp_path: Path, **over) -> list:
    """Command-line args of a tiny, fast CPU pretraining run on real CIFAR-10."""
    base = dict(data="cifar10", arch="resnet18", width=8, train_subset=256, test_subset=200, batch_size=32,
                iters=4, lr=0.5, warmup=0.25, log_freq=1, eval_freq=0, save_freq=0, workers=0, seed=0,
                device="cpu", root=str(tmp_path / "logs"), name="t", verbose="false", temperature=0.5)
    base.update(over)
    out = []
    for k, v in base.items():
        out += [f"--{k}", str(v)]
    return out


@dataclass
class CliResult:
    """What ``subprocess.run(..., capture_output=True, text=True)`` returns, for an in-process call."""
    args: list
    returncode: int
    stdout: str
    stderr: str


def _exit_code(code) -> int:
    # what the interpreter makes of sys.exit(code)
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _in_process(main, argv: list, env: dict, cwd: Path) -> CliResult:
    """``main(argv)`` here, with stdout/stderr captured and the process state it may change (environment,
    working directory, sys.argv, the random generators, signal handlers, torch threads, dtype and determinism, a
    process group) put back afterwards. ``OMP_NUM_THREADS`` in ``env`` sets torch's thread count, as it would in a
    new process."""
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()  # a run seeds all three
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update(env)
        if "OMP_NUM_THREADS" in env:
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = _exit_code(e.code)
            except Exception:  # what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for s, h in handlers.items():
            signal.signal(s, h)
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        if not had_group and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return CliResult(argv, int(code), out.getvalue(), err.getvalue())


def run_cli(*args, env=None, timeout=600, cwd=REPO, subprocess=False):
    """``simclr ...``: in this process by default (see ``_in_process``); with ``subprocess=True`` as a real
    ``python -m simclr`` process (the way a user runs it), killed after ``timeout`` seconds."""
    argv = [str(a) for a in args]
    if not subprocess:
        from simclr import cli
        return _in_process(cli.main, argv, dict(env or {}), Path(cwd))
    e = dict(os.environ)
    e.update(env or {})
    return _subprocess.run([sys.executable, "-m", "simclr", *argv], capture_output=True, text=True,
                           timeout=timeout, env=e, cwd=cwd)


def run_script(path, *args, env=None, cwd=REPO) -> CliResult:
    """``python path args...`` (train.py, an example) run as ``__main__`` in this process, like ``run_cli``."""
    def main(argv):
        sys.argv = [str(path), *argv]
        runpy.run_path(str(path), run_name="__main__")
        return 0
    return _in_process(main, [str(a) for a in args], dict(env or {}), Path(cwd))


# --------------------------------------------------------------------------------------------
# one tiny run per session, copied per test
# --------------------------------------------------------------------------------------------
def run_folder(root: Path) -> Path:
    """The one run folder under ``root`` (``root/<name>/<id>``)."""
    (run,) = [p.parent for p in root.glob("*/*/status.json")]
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A copy of ``run`` at the same place under ``tmp_path/logs`` (``logs/<name>/<id>``)."""
    dest = tmp_path / "logs" / run.parent.name / run.name
    shutil.copytree(run, dest)
    return dest


TRAINED = dict(iters=4, save_freq=1, keep_last=5, eval_at_start="true", train_subset=128, test_subset=100)
# The session's runs are made, and the tests that continue or redo their steps run, with this many torch threads:
# a float sum's order (so its last bits) follows the thread count, and whichever module first asks for a session
# run must not decide the bits the others compare against.
SESSION_THREADS = 1


@pytest.fixture(autouse=True)
def _session_run_threads(request):
    """Tests that use the session's runs get SESSION_THREADS torch threads (the count those runs were made with)."""
    if not {"trained_run", "interrupted_run", "trained_ckpt"} & set(request.fixturenames):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(SESSION_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def _trained_run(tmp_path_factory, data_root) -> Path:
    tmp = tmp_path_factory.mktemp("trained")
    r = run_cli("pretrain", *tiny_args(tmp, **TRAINED), env={"OMP_NUM_THREADS": str(SESSION_THREADS)})
    assert r.returncode == 0, r.stderr[-3000:]
    return run_folder(tmp / "logs")


@pytest.fixture(scope="session")
def _interrupted(tmp_path_factory, data_root) -> tuple:
    """(run folder, what the command printed) of the session's interrupted run."""
    tmp = tmp_path_factory.mktemp("interrupted")
    r = run_cli("pretrain", *tiny_args(tmp, **TRAINED, stop_after=2), env={"OMP_NUM_THREADS": str(SESSION_THREADS)})
    assert r.returncode == 0, r.stderr[-3000:]
    return run_folder(tmp / "logs"), r.stdout


@pytest.fixture(scope="session")
def _interrupted_run(_interrupted) -> Path:
    return _interrupted[0]


@pytest.fixture
def trained_run(_trained_run, tmp_path) -> Path:
    """A finished run of ``tiny_args(**TRAINED)`` (ResNet-18 width 8, 4 steps on 128 CIFAR-10 images, kNN
    at the start and the end, a checkpoint every step), copied to ``tmp_path/logs/t/<id>``."""
    return copy_run(_trained_run, tmp_path)


@pytest.fixture
def interrupted_run(_interrupted_run, tmp_path) -> Path:
    """The trained run's command with ``--stop_after 2``: stopped at step 2 (status interrupted, checkpoints 1
    and 2), copied to ``tmp_path/logs/t/<id>``; resumed, it ends as ``trained_run`` did."""
    return copy_run(_interrupted_run, tmp_path)


@pytest.fixture(scope="session")
def trained_ckpt(_trained_run) -> Path:
    """The final checkpoint of the session's trained run, to read (not to change)."""
    (ckpt,) = sorted(_trained_run.glob("checkpoints/checkpoint-00000004.pt"))
    return ckpt
