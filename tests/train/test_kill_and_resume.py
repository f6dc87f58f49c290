"""Reliability, real faults on real subprocesses (``python -m simclr pretrain``, deterministic CPU mode):

* SIGKILL at three random steps, each time resumed with ``--resume auto --run_dir``: the final weights,
  BN statistics and optimizer state are bit-identical to one uninterrupted run;
* SIGTERM to the process group (trainer and DataLoader workers, as SLURM does): a checkpoint at a step
  boundary, exit 0, status 'interrupted', and the resumed run again
  ends bit-identical; a second signal exits at once;
* a truncated and a corrupted newest checkpoint: auto-resume warns, takes the newest good one, and
  still ends bit-identical.

Set RELIABILITY_SEED to replay a particular choice of kill steps.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from tests.conftest import REPO, run_cli, tiny_args
from simclr import checkpoint as ckpt_lib
from tests.checkpoint.test_crash_safety import tiny_cifar_folder

_FOLDER: list = []

pytestmark = pytest.mark.slow

ITERS = 8  # 4 steps per epoch: the run crosses an epoch boundary (a new data permutation)
ENV = {"OMP_NUM_THREADS": "1"}  # the same kernels in every process (and no oversubscription of 2 cores)


@pytest.fixture(scope="module", autouse=True)
def _tiny_folder(data_root, tmp_path_factory):
    _FOLDER[:] = [tiny_cifar_folder(tmp_path_factory.mktemp("tiny-cifar"), data_root)]


def args(tmp: Path, run_dir: Path, **over) -> list:
    """64 real CIFAR-10 images (see tiny_cifar_folder), batch 16, ResNet-18 of width 8."""
    base = dict(data="folder", data_path=_FOLDER[0], image_size=32, train_subset=0, test_subset=0, batch_size=16,
                iters=ITERS, knn_k=20, deterministic="true", save_freq=1, keep_last=2, run_dir=run_dir)
    base.update(over)
    return ["pretrain", *tiny_args(tmp, **base)]


def popen(argv: list, env_over: Optional[dict] = None) -> subprocess.Popen:
    """A training subprocess in a process group of its own (with its DataLoader workers)."""
    env = {**os.environ, **ENV, **(env_over or {})}
    return subprocess.Popen([sys.executable, "-m", "simclr", *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def newest_step(run_dir: Path) -> int:
    found = ckpt_lib.list_checkpoints(run_dir)
    return int(ckpt_lib.CKPT_RE.search(found[0].name).group(1)) if found else -1


def wait_for(proc: subprocess.Popen, cond, what: str, timeout: float = 300) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{err[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def final_state(run_dir: Path) -> dict:
    ck = ckpt_lib.read(ckpt_lib.checkpoint_path(run_dir, ITERS))
    assert ck["step"] == ITERS
    return ck


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:  # weights and BN running statistics
        assert torch.equal(a["model"][k], b["model"][k]), f"model tensor {k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), f"optimizer state {i}/{k}"


@pytest.fixture(scope="module")
def reference(_tiny_folder, tmp_path_factory) -> dict:
    """One uninterrupted run; its folder keeps every checkpoint (the corrupt-checkpoint test copies it)."""
    tmp = tmp_path_factory.mktemp("ref")
    r = run_cli(*args(tmp, tmp / "run", keep_last=100), env=ENV)
    assert r.returncode == 0, r.stderr
    return {"dir": tmp / "run", "state": final_state(tmp / "run")}


def test_sigkill_at_three_random_steps_resumes_bit_identical(reference, tmp_path):
    seed = int(os.environ.get("RELIABILITY_SEED", random.randrange(10 ** 6)))
    kill_after = sorted(random.Random(seed).sample(range(1, ITERS - 2), 3))
    run = tmp_path / "run"
    resumed_at = []
    for k in kill_after:
        # every invocation is the same command: the first finds nothing to resume and starts at 0. Each
        # must make progress before it dies (the previous kill may have landed a step late)
        target = max(k, newest_step(run) + 1)
        p = popen(args(tmp_path, run, resume="auto"))
        wait_for(p, lambda: newest_step(run) >= target, f"checkpoint {target} (seed {seed})")
        p.send_signal(signal.SIGKILL)  # no handler, no cleanup: maybe in the middle of a step or a save
        p.communicate()
        assert p.returncode == -signal.SIGKILL
        resumed_at.append(newest_step(run))
    r = run_cli(*args(tmp_path, run, resume="auto"), env=ENV)
    assert r.returncode == 0, r.stderr
    log = (run / "log.txt").read_text()
    assert log.count("resumed from") == 3, log  # the 2nd, 3rd and last invocation each resumed
    assert f"at step {resumed_at[-1]}" in log
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert_bit_identical(final_state(run), reference["state"])
    # --keep_last 2 held across the kills; a kill during a save leaves a temp file, removed by the next prune
    assert [c.name for c in ckpt_lib.list_checkpoints(run)] == ["checkpoint-00000008.pt", "checkpoint-00000007.pt"]
    assert [p.name for p in (run / "checkpoints").iterdir() if ".tmp" in p.name] == []


def temp_files(run_dir: Path) -> set:
    """The temporary files of checkpoints (or cards) being written; each save's has a fresh random name."""
    try:
        return {n for n in os.listdir(run_dir / "checkpoints") if n.startswith(".checkpoint-")}
    except OSError:
        return set()


def test_sigkill_mid_save_and_mid_step_with_other_thread_counts_resumes_bit_identical(reference, tmp_path):
    """The kill -9 campaign in which a run once ended ~1e-7 apart: kills while a checkpoint's temp
    file is being written (polled for, so the kill lands inside the save) and at random moments, each next
    process started with another OMP_NUM_THREADS. The thread count was the order dependence found: CPU
    sums split by thread, so a process with another count continues a few ulps apart (1 vs 2 threads:
    1e-2 apart after 8 steps). With --deterministic the checkpoint's count is restored; the final state
    is bit-identical to the uninterrupted one-thread run."""
    seed = int(os.environ.get("RELIABILITY_SEED", random.randrange(10 ** 6)))
    rng = random.Random(seed)
    run = tmp_path / "run"
    mid_save = 0
    for attempt in range(4):
        threads = "1" if attempt == 0 else rng.choice(["1", "2"])  # the first one makes the trajectory
        target = newest_step(run) + 1
        p = popen(args(tmp_path, run, resume="auto"), {"OMP_NUM_THREADS": threads})
        wait_for(p, lambda: newest_step(run) >= max(target, 1), f"checkpoint {target} (seed {seed})")
        stale = temp_files(run)  # left by an earlier kill, until this process prunes them
        if attempt % 2 == 0:  # inside the next save
            deadline = time.time() + 120
            while not temp_files(run) - stale and p.poll() is None and time.time() < deadline:
                time.sleep(0.0005)
        else:  # anywhere in the next steps
            time.sleep(rng.uniform(0, 0.1))  # within a step or two: a fast run (a quiet box) must still be going
        p.send_signal(signal.SIGKILL)
        p.communicate()
        assert p.returncode == -signal.SIGKILL, f"the run ended before the kill (seed {seed})"
        mid_save += bool(temp_files(run) - stale)  # the killed save left its temporary file behind
    r = run_cli(*args(tmp_path, run, resume="auto"), env={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    assert mid_save >= 1, f"no kill landed inside a save (seed {seed})"
    assert_bit_identical(final_state(run), reference["state"])
    log = (run / "log.txt").read_text()
    assert log.count("resumed from") == 4 and "this process had 2" in log
    assert [p.name for p in (run / "checkpoints").iterdir() if ".tmp" in p.name] == []


def test_sigterm_saves_at_step_boundary_exits_0_and_resumes_bit_identical(reference, tmp_path):
    run = tmp_path / "run"
    # no periodic checkpoints: the one found is SIGTERM's. Two DataLoader workers, which also get the
    # signal (SLURM and Ctrl-C signal every process of the job); what a step draws does not depend on them
    p = popen(args(tmp_path, run, save_freq=0, workers=2))

    def steps_logged() -> int:
        m = run / "metrics.jsonl"
        return sum('"loss"' in ln for ln in m.read_text().splitlines()) if m.exists() else 0

    wait_for(p, lambda: steps_logged() >= 2, "two logged steps")
    os.killpg(p.pid, signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "stopping after this step" in err
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "interrupted"
    s = status["step"]
    assert 2 <= s < ITERS
    assert f"status: interrupted at step {s}" in out
    assert f"pretrain --resume {run}" in out  # the stop says how to go on
    assert [c.name for c in ckpt_lib.list_checkpoints(run)] == [f"checkpoint-{s:08d}.pt"]
    ck = ckpt_lib.read(ckpt_lib.checkpoint_path(run, s))
    assert ck["step"] == s
    # the checkpoint is the state after exactly s steps: identical to the reference's checkpoint s
    ref_s = ckpt_lib.read(ckpt_lib.checkpoint_path(reference["dir"], s))
    assert_bit_identical(ck, ref_s)

    r = run_cli(*args(tmp_path, run, save_freq=0, resume="auto", workers=2), env=ENV)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert_bit_identical(final_state(run), reference["state"])


def test_second_signal_exits_at_once(tmp_path):
    run = tmp_path / "run"
    p = popen(args(tmp_path, run, iters=10_000, save_freq=0))
    wait_for(p, lambda: (run / "metrics.jsonl").exists(), "the first logged step")
    # two different signals: the kernel merges a second pending SIGTERM into the first
    p.send_signal(signal.SIGTERM)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT), err
    assert "second signal" in err
    assert ckpt_lib.list_checkpoints(run) == []  # it did not wait for the step to end to save
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"


def test_corrupt_newest_checkpoints_auto_resume_takes_previous(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    ckpts = run / "checkpoints"
    # the final checkpoint truncated (a crash of a writer without atomic rename), the one before it
    # with a flipped byte (bit rot); a leftover temp file from a killed save
    p8, p7 = ckpt_lib.checkpoint_path(run, 8), ckpt_lib.checkpoint_path(run, 7)
    p8.write_bytes(p8.read_bytes()[:1000])
    data = bytearray(p7.read_bytes())
    data[len(data) // 3] ^= 0x01
    p7.write_bytes(bytes(data))
    (ckpts / ".checkpoint-00000009.pt.tmp99999").write_bytes(b"partial")
    for s in range(1, 6):  # fewer files to verify
        ckpt_lib.checkpoint_path(run, s).unlink()
    r = run_cli(*args(tmp_path, run, resume="auto"), env=ENV)
    assert r.returncode == 0, r.stderr
    assert "skipping checkpoint-00000008.pt" in r.stderr and "skipping checkpoint-00000007.pt" in r.stderr
    log = (run / "log.txt").read_text()
    assert "skipping checkpoint-00000008.pt" in log and "resumed from" in log and "at step 6" in log
    assert_bit_identical(final_state(run), reference["state"])
    assert not (ckpts / ".checkpoint-00000009.pt.tmp99999").exists()
