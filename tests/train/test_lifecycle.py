"""A long run as users live it, through the real CLI: stop, see how to continue, continue by run folder,
refuse a resume that would silently change the run, and point any command that wants a checkpoint at a
run folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tests.conftest import TRAINED, run_cli, tiny_args
from simclr import checkpoint as ckpt_lib


def _run(tmp_path: Path, **over) -> tuple:
    r = run_cli("pretrain", *tiny_args(tmp_path, **over))
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = [p.parent for p in (tmp_path / "logs").glob("t/*/status.json")]
    return r, run


def test_stop_prints_the_command_that_continues_and_resume_by_folder_finishes_the_same_run(_interrupted,
                                                                                         interrupted_run):
    run = interrupted_run
    original, stdout = _interrupted  # what `simclr pretrain --iters 4 --stop_after 2` printed
    assert "status: interrupted at step 2" in stdout
    assert f"pretrain --resume {original}" in stdout
    # the printed command alone (the run's own config.yaml is the base config)
    r2 = run_cli("pretrain", "--resume", run)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "status: finished at step 4" in r2.stdout and f"run folder: {run}" in r2.stdout
    assert [p.name for p in ckpt_lib.list_checkpoints(run)][0] == "checkpoint-00000004.pt"
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


def test_resume_that_changes_the_trajectory_is_refused_unless_allowed(interrupted_run):
    run = interrupted_run
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


def test_resume_auto_without_run_dir_continues_the_newest_run_of_the_name(interrupted_run, tmp_path):
    run = interrupted_run
    r = run_cli("pretrain", *tiny_args(tmp_path, **dict(TRAINED, resume="auto")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"run folder: {run}" in r.stdout and "finished at step 4" in r.stdout
    assert len(list((tmp_path / "logs" / "t").iterdir())) == 1


def test_a_run_folder_or_a_card_means_its_newest_valid_checkpoint(trained_run, tmp_path):
    run = trained_run
    newest = ckpt_lib.checkpoint_path(run, 4)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated: the one before must be taken
    want = ckpt_lib.checkpoint_path(run, 3)
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
    import numpy as np
    images = tmp_path / "imgs"
    images.mkdir()
    for src in sorted((Path(os.environ["DATA_ROOT"]) / "cifar10" / "test").glob("*/*.jpg"))[:3]:
        (images / src.name).write_bytes(src.read_bytes())
    for i, ck in enumerate((run, want.with_suffix(".json"), want)):  # a folder, a card, the file: one result
        r = run_cli("embed", "--encoder_ckpt", ck, "--images", images, "--out", tmp_path / f"f{i}.npy",
                    "--device", "cpu")
        assert r.returncode == 0, r.stderr[-3000:]
    feats = [np.load(tmp_path / f"f{i}.npy") for i in range(3)]
    assert feats[0].shape[0] == 3 and np.array_equal(feats[0], feats[2]) and np.array_equal(feats[1], feats[2])
    from simclr import load_encoder
    assert load_encoder(run).source == str(want)
    assert load_encoder(want.with_suffix(".json")).source == str(want)  # a card: the file it describes


def test_a_forgotten_encoder_is_a_labelled_reproducible_baseline(tmp_path):
    args = ["knn", "--train_subset", "200", "--test_subset", "100", "--encoder_arch", "resnet18", "--encoder_width",
            "8", "--device", "cpu", "--verbose", "false", "--root", tmp_path / "ev"]
    outs = [run_cli(*args) for _ in range(2)]
    for r in outs:
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.startswith("BASELINE: a randomly initialised encoder"), r.stdout
    evals = [json.loads(p.read_text()) for p in sorted((tmp_path / "ev").glob("*/*/eval.json"))]
    assert [e["kind"] for e in evals] == ["baseline", "baseline"]
    assert evals[0]["top1"] == evals[1]["top1"] and evals[0]["config"]["seed"] == 0  # the same baseline each time


def test_logs_to_a_file_are_plain_timestamped_lines_with_progress(tmp_path):
    """stderr is a pipe here, as under SLURM: no progress bar, no carriage returns."""
    import re
    r, _ = _run(tmp_path, iters=2, log_freq=1, verbose="true")
    assert "\r" not in r.stderr
    steps = [ln for ln in r.stderr.splitlines() if " step 1/2 " in ln or " step 2/2 " in ln]
    assert len(steps) == 2, r.stderr
    pattern = (r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step 2/2 epoch 0\.\d\d loss [\d.]+ contrast_acc [\d.]+ .* img/s "
               r"data \d+% elapsed \d+:\d\d:\d\d eta 0:00:00$")
    assert re.match(pattern, steps[1]), steps[1]


def test_the_index_keeps_the_first_start_and_sums_the_training_time_of_every_invocation(interrupted_run, tmp_path):
    import time
    run = interrupted_run
    first = json.loads((run / "status.json").read_text())
    time.sleep(3)  # a pause between the two invocations: not training time
    r = run_cli("pretrain", "--resume", run)
    assert r.returncode == 0, r.stderr[-3000:]
    second = json.loads((run / "status.json").read_text())
    assert second["started"] == first["started"]
    r = run_cli("runs", "--root", tmp_path / "logs", "--format", "json", "--columns", "id,started,duration,step")
    (row,) = json.loads(r.stdout)
    assert row["step"] == 4
    wall = second["updated"] - first["started"]  # first start to last update, the pause included
    assert first["train_s"] < row["duration"] <= wall - 2.5, (row, first, second)
    assert abs(row["duration"] - second["train_s"]) <= 0.5
    from datetime import datetime
    assert abs(datetime.fromisoformat(row["started"]).timestamp() - first["started"]) < 1.0


def _help(command: str) -> str:
    r = run_cli(command, "--help")
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_every_subcommand_lists_only_its_options_each_with_help():
    import re
    from simclr.cli import COMMANDS
    from simclr.eval_options import KNN_KEYS, EvalConfig
    for command in COMMANDS:
        lines = _help(command).splitlines()
        opts = [i for i, ln in enumerate(lines) if re.match(r"^  (--\w+|[A-Z_]+)\b", ln)]
        assert opts, command
        for i in opts:  # the line below each option is its help text
            assert lines[i + 1].startswith("        ") and len(lines[i + 1].strip()) > 6, (command, lines[i])
    knn = set(re.findall(r"^  --(\w+)", _help("knn"), re.M))
    assert knn == set(KNN_KEYS)
    assert {"protocol", "dist", "save_freq", "lr", "iters"}.isdisjoint(knn)
    assert set(EvalConfig.__dataclass_fields__) - set(re.findall(r"^  --(\w+)", _help("eval"), re.M)) == set()
    r = run_cli("knn", "--lr", "0.1")
    assert r.returncode == 2 and "option 'lr' (on the command line) belongs to `simclr eval`" in r.stderr


def test_version_and_a_closed_pipe():
    import subprocess
    import sys
    import simclr
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"simclr {simclr.__version__}"
    # `simclr pretrain --help | head -1`: the reader goes away early; no BrokenPipeError traceback
    p = subprocess.run(f"{sys.executable} -m simclr pretrain --help | head -1", shell=True, capture_output=True,
                       text=True, timeout=120)
    assert p.stdout.startswith("usage: simclr pretrain") and p.stderr == "", p.stderr


def test_a_checkpoint_resumed_under_another_config_is_refused_and_nothing_rewritten(tmp_path):
    """A run of --iters 200 resumed from its checkpoint file with configs/tiny_test.yaml (iters 20) used to
    train "20 steps" and rewrite config.yaml silently."""
    root = tmp_path / "logs"
    r = run_cli("pretrain", "--config", "configs/tiny_test.yaml", "--iters", "200", "--stop_after", "3",
                "--root", root, "--train_subset", "128", "--batch_size", "32", "--verbose", "false")
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = root.glob("tiny/*")
    ck = ckpt_lib.checkpoint_path(run, 3)
    before = (run / "config.yaml").read_text()
    r = run_cli("pretrain", "--config", "configs/tiny_test.yaml", "--ckpt", ck, "--run_dir", run,
                "--train_subset", "128", "--batch_size", "32", "--verbose", "false")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "iters: 200 -> 20" in r.stderr and "--allow_config_change true" in r.stderr
    assert (run / "config.yaml").read_text() == before and "iters: 200" in before
    assert [p.name for p in ckpt_lib.list_checkpoints(run)] == ["checkpoint-00000003.pt"]


def test_resuming_a_finished_run_does_not_rerun_the_knn(tmp_path, data_root):
    first = run_cli("pretrain", *tiny_args(tmp_path, verbose="true"))
    assert first.returncode == 0, first.stderr
    run = next(ln.split(": ", 1)[1] for ln in first.stdout.splitlines() if ln.startswith("run folder: "))
    knn = next(ln for ln in first.stdout.splitlines() if ln.startswith("kNN top-1 after pretraining"))
    again = run_cli("pretrain", "--resume", run)
    assert again.returncode == 0, again.stderr
    assert "nothing to do: the run is already at step 4 of 4" in again.stderr
    assert "kNN monitor" not in again.stderr  # the result of the checkpoint, not a second pass over the data
    # nothing is announced as if it trained, and nothing is saved again
    assert "pretraining resnet18" not in again.stderr and "saved checkpoint" not in again.stderr
    assert knn in again.stdout
