"""A long run as users live it, through the real CLI: stop, see how to continue, continue by run folder,
refuse a resume that would silently change the run, and point any command that wants a checkpoint at a
run folder."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import run_cli, tiny_args
from simclr import checkpoint as ckpt_lib


def _run(tmp_path: Path, **over) -> tuple:
    r = run_cli("pretrain", *tiny_args(tmp_path, **over))
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = [p.parent for p in (tmp_path / "logs").glob("t/*/status.json")]
    return r, run


def test_stop_prints_the_command_that_continues_and_resume_by_folder_finishes_the_same_run(tmp_path):
    r, run = _run(tmp_path, iters=4, stop_after=2)
    assert "status: interrupted at step 2" in r.stdout
    assert f"continue with: simclr pretrain --resume {run}" in r.stdout
    # the printed command alone (the run's own config.yaml is the base config)
    r2 = run_cli("pretrain", "--resume", run)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "status: finished at step 4" in r2.stdout and f"run folder: {run}" in r2.stdout
    assert [p.name for p in ckpt_lib.list_checkpoints(run)][0] == "checkpoint-00000004.pt"
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


def test_resume_that_changes_the_trajectory_is_refused_unless_allowed(tmp_path):
    _, run = _run(tmp_path, iters=4, stop_after=2)
    r = run_cli("pretrain", "--resume", run, "--iters", "20", "--lr", "0.1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "iters: 4 -> 20" in r.stderr and "lr: 0.5 -> 0.1" in r.stderr and "--allow_config_change true" in r.stderr
    assert "iters: 4" in (run / "config.yaml").read_text()  # nothing rewritten
    r = run_cli("pretrain", "--resume", run, "--iters", "5", "--allow_config_change", "--verbose", "false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained with iters=4, this run continues with iters=5" in r.stderr
    history = [json.loads(ln) for ln in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 2 and history[-1]["changes"] == {"iters": [4, 5]}
    assert "continues with iters=5" in (run / "log.txt").read_text()


def test_resume_auto_without_run_dir_continues_the_newest_run_of_the_name(tmp_path):
    _, run = _run(tmp_path, iters=4, stop_after=2)
    r = run_cli("pretrain", *tiny_args(tmp_path, iters=4, resume="auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"run folder: {run}" in r.stdout and "finished at step 4" in r.stdout
    assert len(list((tmp_path / "logs" / "t").iterdir())) == 1


def test_a_run_folder_or_a_card_means_its_newest_valid_checkpoint(tmp_path):
    _, run = _run(tmp_path, iters=3, save_freq=1, keep_last=3)
    newest = ckpt_lib.checkpoint_path(run, 3)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated: the one before must be taken
    want = ckpt_lib.checkpoint_path(run, 2)
    r = run_cli("knn", "--encoder_ckpt", run, "--train_subset", "100", "--test_subset", "50", "--device", "cpu",
                "--root", tmp_path / "ev", "--verbose", "false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"using its newest valid checkpoint {want}" in r.stderr
    (ev,) = (tmp_path / "ev").glob("*/*/eval.json")
    assert json.loads(ev.read_text())["encoder"]["path"] == str(want)
    out = tmp_path / "enc.pth"
    r = run_cli("export", run, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    sd = torch.load(out, map_location="cpu", weights_only=True)
    ref = ckpt_lib.read(want)["model"]
    assert torch.equal(sd["conv1.weight"], ref["convnet.conv1.weight"])
    from simclr import load_encoder
    assert load_encoder(run).source == str(want)
    assert load_encoder(want.with_suffix(".json")).source == str(want)  # a card: the file it describes
