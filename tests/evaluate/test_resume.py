"""A pre-empted SGD linear evaluation goes on where it stopped (simclr.evaluate.resume): periodic head checkpoints
(--save_freq, --ckpt_iter), a stop with a checkpoint (--stop_after, SIGTERM), --resume RUN / auto, and a resume
that would be another evaluation refused in one line.

Each resumed evaluation is compared with an uninterrupted one of the same command, run on its own: the final head
must be bit-identical (torch.equal) and so must the top-1 in eval.json. Tiny sizes: the session's ResNet-18 of
width 8 (conftest's trained_ckpt), 128 training and 100 test images of CIFAR-10.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli
from simclr import checkpoint as ckpt_lib

ENV = {"OMP_NUM_THREADS": "1"}  # the thread count the session's runs use (conftest.SESSION_THREADS)


def eval_args(tmp_path: Path, ckpt: Path, **over) -> list:
    base = dict(encoder_ckpt=ckpt, train_subset=128, test_subset=100, augmentation="none", iters=12, batch_size=32,
                lr=0.1, seed=0, workers=0, device="cpu", verbose="false", root=tmp_path / "logs", name="ev")
    base.update(over)
    out = ["eval"]
    for k, v in base.items():
        out += [f"--{k}", str(v)]
    return out


def evaluate(*args):
    r = run_cli(*args, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def head(path: Path) -> dict:
    return ckpt_lib.read(path)


def assert_same_result(run: Path, reference: Path, name: str = "linear-head.pt") -> None:
    a, b = head(run / "checkpoints" / name), head(reference / "checkpoints" / name)
    for k in ("weight", "bias"):
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), f"head {k} differs"
    if "encoder" in b:
        assert a["encoder"].keys() == b["encoder"].keys()
        for k in b["encoder"]:  # fine-tuned weights and batch-norm statistics
            assert torch.equal(a["encoder"][k], b["encoder"][k]), f"fine-tuned encoder tensor {k} differs"
    got, want = (json.loads((r / "eval.json").read_text()) for r in (run, reference))
    assert got["top1"] == want["top1"] and got["top5"] == want["top5"]


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def names(run: Path) -> list:
    return sorted(p.name for p in (run / "checkpoints").glob("*.pt"))


def test_precomputed_features_stopped_twice_and_resumed_end_bit_identical(tmp_path, trained_ckpt):
    # 128 rows in batches of 32: 4 steps per epoch, so the stops (5, 10) fall inside the second and third epochs
    common = dict(iters=12, save_freq=4)
    evaluate(*eval_args(tmp_path, trained_ckpt, run_dir=tmp_path / "A", **common))
    run = tmp_path / "B"
    r = evaluate(*eval_args(tmp_path, trained_ckpt, run_dir=run, stop_after=5, **common))
    assert "status: interrupted at step 5 of 12" in r.stdout
    assert f"eval --resume {run}" in r.stdout  # the stop says how to go on
    assert status(run)["status"] == "interrupted" and status(run)["step"] == 5
    assert not (run / "eval.json").exists()
    assert names(run) == ["linear-head-00000004.pt", "linear-head-00000005.pt"]
    # a periodic head is an ordinary head: eval-only scores it
    assert head(run / "checkpoints" / "linear-head-00000005.pt")["step"] == 5

    # the printed command alone: the run's config.yaml is the base, its --stop_after 5 included (each job its slice)
    r = evaluate("eval", "--resume", run)
    assert "status: interrupted at step 10 of 12" in r.stdout
    assert names(run) == ["linear-head-00000008.pt", "linear-head-00000010.pt"]  # --keep_last 2
    r = evaluate("eval", "--resume", run, "--keep_last", "3")  # an option that changes nothing may change
    assert "top-1" in r.stdout and status(run)["status"] == "finished"
    assert_same_result(run, tmp_path / "A")
    log = (run / "log.txt").read_text()
    assert "resumed from" in log and "at step 5" in log and "at step 10" in log


@pytest.mark.parametrize("finetune", [False, True], ids=["frozen", "finetune"])
def test_images_augmented_on_the_fly_stopped_and_resumed_end_bit_identical(tmp_path, trained_ckpt, finetune):
    """The spec's default path (RandomCrop on the fly, features every step) and fine-tuning (encoder, its batch-norm
    statistics and its optimizer state restored)."""
    common = dict(iters=6, augmentation="RandomCrop", save_freq=2, finetune=str(finetune).lower())
    if finetune:
        common["encoder_lr"] = 0.05
    name = "finetuned.pt" if finetune else "linear-head.pt"
    evaluate(*eval_args(tmp_path, trained_ckpt, run_dir=tmp_path / "A", **common))
    run = tmp_path / "B"
    evaluate(*eval_args(tmp_path, trained_ckpt, run_dir=run, stop_after=3, **common))
    assert status(run)["status"] == "interrupted" and status(run)["step"] == 3
    evaluate(*eval_args(tmp_path, trained_ckpt, run_dir=run, resume="auto", **common))
    assert status(run)["status"] == "finished"
    assert_same_result(run, tmp_path / "A", name)


def test_a_resume_that_would_be_another_evaluation_is_refused_in_one_line(tmp_path, trained_ckpt):
    run = tmp_path / "B"
    evaluate(*eval_args(tmp_path, trained_ckpt, run_dir=run, stop_after=2, iters=8))
    r = run_cli("eval", "--resume", run, "--lr", "0.5", "--batch_size", "16", env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert "that would be another evaluation" in line and "lr: 0.1 -> 0.5" in line and "batch_size: 32 -> 16" in line
    assert status(run)["status"] == "failed"  # a requeue loop stops; nothing else was written
    assert names(run) == ["linear-head-00000002.pt"] and not (run / "eval.json").exists()

    # another encoder file (the same run's checkpoint of step 3): its content is compared, not its path
    other = trained_ckpt.with_name("checkpoint-00000003.pt")
    r = run_cli("eval", "--resume", run, "--encoder_ckpt", other, env=ENV)
    assert r.returncode == 2 and "encoder sha256" in r.stderr

    # protocols without steps have nothing to continue
    r = run_cli("eval", "--resume", run, "--protocol", "fast-linear", env=ENV)
    assert r.returncode == 2 and "has no steps to continue" in r.stderr
    # a pretraining run is no evaluation
    r = run_cli("eval", "--resume", trained_ckpt.parent.parent, env=ENV)
    assert r.returncode == 2 and "not a linear evaluation" in r.stderr


def test_a_resume_of_a_folder_in_use_is_refused_before_reading_data_or_checkpoints(tmp_path, trained_ckpt,
                                                                                   monkeypatch):
    import fcntl

    from simclr.evaluate import run as eval_run
    from simclr.evaluate import resume as eval_resume
    run = tmp_path / "B"
    evaluate(*eval_args(tmp_path, trained_ckpt, run_dir=run, stop_after=2, iters=8))
    touched = []
    monkeypatch.setattr(eval_run, "load_inputs", lambda *a: touched.append("data"))
    monkeypatch.setattr(eval_resume, "_newest_state", lambda *a: touched.append("checkpoint"))
    fd = os.open(run / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process's evaluation of the folder
        r = run_cli("eval", "--resume", run, env=ENV)
    finally:
        os.close(fd)
    assert r.returncode == 2 and "is in use by" in r.stderr
    assert touched == [] and status(run)["status"] == "interrupted"


@pytest.mark.slow  # a real process or a long wait: `make test` runs it, `make test-fast` leaves it out
def test_sigterm_saves_the_head_at_a_step_exits_0_and_resumes_bit_identical(tmp_path, trained_ckpt):
    """A real process signalled as SLURM does (its whole process group): the step ends, the head is saved, exit 0."""
    common = dict(iters=3000)
    run = tmp_path / "B"
    argv = eval_args(tmp_path, trained_ckpt, run_dir=run, save_freq=1, **common)
    p = subprocess.Popen([sys.executable, "-m", "simclr", *argv], cwd=REPO, env={**os.environ, **ENV},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.time()
    while not list((run / "checkpoints").glob("linear-head-*.pt")):  # the steps have begun
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.time() - t0 < 300, "no head checkpoint within 300 s"
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "stopping after this step" in err
    s = status(run)["step"]
    assert status(run)["status"] == "interrupted" and 1 <= s < 3000
    assert f"status: interrupted at step {s} of 3000" in out and f"eval --resume {run}" in out
    assert f"linear-head-{s:08d}.pt" in names(run)

    evaluate(*eval_args(tmp_path, trained_ckpt, run_dir=tmp_path / "A", **common))
    evaluate("eval", "--resume", run, "--save_freq", "0")  # a checkpoint every step was for the signal only
    assert_same_result(run, tmp_path / "A")
