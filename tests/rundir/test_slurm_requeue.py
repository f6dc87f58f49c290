"""docs/long-runs.md's SLURM requeue script, run as it is written (read from the page, not copied), with stand-ins
for ``srun`` and ``scontrol`` on PATH: every start stages the images to a new node-local path, as a job on another
node would. Real processes: the script, its ``simclr`` and its requeue loop are the point."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.folder_runs import CLASSES

REPO = Path(__file__).resolve().parents[2]

# what makes the spec's ResNet-50 run a tiny one: appended by the srun stand-in (the command line's last value
# wins); --stop_after 2 makes every start stop as a time-limit signal would, so 6 steps take three starts
TINY = ("--arch resnet18 --width 8 --batch_size 8 --iters 6 --stop_after 2 --lr 0.5 --warmup 0.25 --save_freq 1 "
        "--eval_freq 0 --log_freq 1 --workers 0 --device cpu --dist none --sync_bn false --seed 0 --verbose false")


def documented_script() -> str:
    """The bash block of the page's "SLURM with requeue" section."""
    text = (REPO / "docs" / "long-runs.md").read_text()
    section = text[text.index("## SLURM with requeue"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def stand_ins(bin_dir: Path, requeued: Path) -> None:
    """``srun CMD...`` runs CMD with TINY appended; ``scontrol requeue ID`` records the request; ``simclr`` is this
    checkout's CLI."""
    bin_dir.mkdir()
    scripts = {
        "srun": f'#!/bin/sh\nexec "$@" {TINY}\n',
        "scontrol": f'#!/bin/sh\necho "$@" >> "{requeued}"\n',
        "simclr": f'#!/bin/sh\nPYTHONPATH="{REPO / "src"}" exec "{sys.executable}" -m simclr "$@"\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)


def tiny_cifar(where: Path, data_root: Path) -> None:
    for split, n in (("train", 4), ("test", 2)):
        for c in CLASSES:
            (where / split / c).mkdir(parents=True)
            for f in sorted((data_root / "cifar10" / split / c).iterdir())[:n]:
                shutil.copy(f, where / split / c / f.name)


def run_jobs(tmp_path: Path, data_root: Path, before_start=lambda i: None, max_starts: int = 6) -> list:
    """Submit the script, then start it again while it asks to be requeued (at most ``max_starts``), each start
    on a fresh node-local $TMPDIR. Returns [(exit code, stderr)] of the starts."""
    script = tmp_path / "job.sh"
    script.write_text(documented_script())
    requeued = tmp_path / "requeued.txt"
    stand_ins(tmp_path / "bin", requeued)
    scratch = tmp_path / "scratch"
    tiny_cifar(scratch / "data" / "cifar10", data_root)
    starts = []
    for i in range(max_starts):
        before_start(i)
        tmpdir = tmp_path / f"node-{i}" / "tmp"  # another node's local disk: the copy lies elsewhere every time
        tmpdir.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_"))}
        env.update(PATH=f"{tmp_path / 'bin'}{os.pathsep}{env.get('PATH', '')}", SCRATCH=str(scratch),
                   TMPDIR=str(tmpdir), SLURM_JOB_ID="4242", SLURM_RESTART_COUNT=str(i), OMP_NUM_THREADS="1",
                   SIMCLR_CACHE=str(tmp_path / "cache"))
        env.pop("DATA_ROOT", None)  # the script sets it
        requeued.unlink(missing_ok=True)
        r = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        starts.append((r.returncode, r.stderr))
        if not requeued.exists():
            break
        assert requeued.read_text().split() == ["requeue", "4242"]
    return starts


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


@pytest.mark.slow  # three real starts of the CLI: about 25 s on a 2-core CPU
def test_the_documented_requeue_script_trains_to_the_end_with_the_data_staged_anew_each_time(tmp_path, data_root):
    """Observation: once the data was staged to $TMPDIR, every requeued start was refused before training and
    status.json still said "interrupted", so the script requeued forever. Now three starts (2 steps each, on three
    copies at three paths) train all 6 steps, and the loop ends."""
    starts = run_jobs(tmp_path, data_root)
    run = tmp_path / "scratch" / "simclr" / "c10-4242"
    assert len(starts) == 3, starts
    assert status(run)["status"] == "finished" and status(run)["step"] == 6, status(run)
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*.pt"))[-1] == "checkpoint-00000006.pt"
    log = (run / "log.txt").read_text()
    assert "at step 2" in log and "at step 4" in log, log
    # every start read its own copy, and the three copies shared one decoded-array cache entry per split
    assert all((tmp_path / f"node-{i}" / "tmp" / "data" / "cifar10" / "train").is_dir() for i in range(3))
    assert len(list((tmp_path / "cache").glob("cifar10-train-*.npz"))) == 1


@pytest.mark.slow  # a real process or a long wait: `make test` runs it, `make test-fast` leaves it out
def test_a_refused_resume_stops_the_requeue_loop(tmp_path, data_root):
    """Really other images (one removed from the source after the first start) are refused on the second start;
    status.json then says failed with the error, and the script's loop stops instead of requeueing forever."""
    def before_start(i: int) -> None:
        if i == 1:
            victim = sorted((tmp_path / "scratch" / "data" / "cifar10" / "train" / CLASSES[0]).iterdir())[0]
            victim.unlink()

    starts = run_jobs(tmp_path, data_root, before_start)
    run = tmp_path / "scratch" / "simclr" / "c10-4242"
    assert len(starts) == 2, starts
    assert "error: the training images changed" in starts[1][1], starts[1]  # (the script's code is grep's)
    got = status(run)
    assert got["status"] == "failed" and "training images changed" in got["error"] and got["step"] == 2, got
