"""A console log in the run folder is a cluster habit, not a foreign file: `mkdir R; simclr pretrain --run_dir R
> R/stdout.log` and SLURM's `--output=R/slurm-%j.out` create a file in R before the run starts. Every kind of
run must accept such a folder; only a file the run would write over or append to is refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.folder_runs import cli, knn_args, one_error, pretrain_args, tiny_folder, tree_digest
from simclr import checkpoint as ckpt_lib

_DATA: list = []
_ENCODER: list = []


@pytest.fixture(autouse=True, scope="module")
def _setup(data_root, tmp_path_factory):
    _DATA[:] = [tiny_folder(tmp_path_factory.mktemp("tiny"), data_root)]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    enc = tmp_path_factory.mktemp("enc") / "E"
    rc, _, err = cli(*pretrain_args(_DATA[0], enc.parent / "logs", run_dir=enc, iters=2))
    assert rc == 0, err
    _ENCODER[:] = [ckpt_lib.checkpoint_path(enc, 2)]
    yield
    torch.set_num_threads(n)


def eval_args(run_dir: Path) -> list:
    return ["eval", "--data", "folder", "--data_path", _DATA[0], "--image_size", 32, "--encoder_ckpt", _ENCODER[0],
            "--device", "cpu", "--workers", 0, "--run_dir", run_dir, "--verbose", "false", "--cache_features",
            "false", "--protocol", "linear", "--iters", 2, "--batch_size", 16]


def command(kind: str, run_dir: Path) -> list:
    if kind == "pretrain":
        return pretrain_args(_DATA[0], run_dir.parent / "logs", run_dir=run_dir, iters=2)
    if kind == "knn":
        return knn_args(_DATA[0], run_dir.parent / "logs", _ENCODER[0], run_dir=run_dir)
    return eval_args(run_dir)


@pytest.mark.parametrize("log", ["stdout.log", "slurm-123.out"])
@pytest.mark.parametrize("kind", ["pretrain", "knn", "eval"])
def test_a_console_log_in_the_run_folder_is_accepted(tmp_path, kind, log):
    """Observation: the folder 'holds files of its own' and was refused, for pretrain, eval and knn."""
    run = tmp_path / "R"
    run.mkdir()
    (run / log).write_text("the job's first console line\n")
    rc, out, err = cli(*command(kind, run))
    assert rc == 0, err
    assert (run / log).read_text() == "the job's first console line\n", "the console log is never touched"
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    if kind == "pretrain":  # and a requeued job (its own new log beside) resumes it
        (run / "slurm-124.out").write_text("requeued\n")
        rc, out, err = cli("pretrain", "--resume", run, "--iters", 3, "--allow_config_change", "true")
        assert rc == 0, err
        assert [p.name for p in ckpt_lib.list_checkpoints(run)][0] == "checkpoint-00000003.pt"


@pytest.mark.parametrize("name", ["log.txt", "metrics.jsonl", "env.json", "config_history.jsonl"])
@pytest.mark.parametrize("kind", ["pretrain", "knn"])
def test_a_file_the_run_would_write_over_or_append_to_is_still_refused(tmp_path, kind, name):
    run = tmp_path / "R"
    run.mkdir()
    (run / "slurm-123.out").write_text("console\n")
    (run / name).write_text("the user's own\n")
    before = tree_digest(run)
    rc, _, err = cli(*command(kind, run))
    one_error(rc, err, str(run), name, "--run_dir")
    assert tree_digest(run) == before and sorted(p.name for p in run.iterdir()) == sorted([name, "slurm-123.out"])


def test_a_foreign_checkpoints_folder_is_refused_and_an_empty_one_is_not(tmp_path):
    run = tmp_path / "R"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-00000001.pt").write_bytes(b"someone else's weights")
    rc, _, err = cli(*command("pretrain", run))
    one_error(rc, err, "checkpoints")
    assert (run / "checkpoints" / "checkpoint-00000001.pt").read_bytes() == b"someone else's weights"
    empty = tmp_path / "E"
    (empty / "checkpoints").mkdir(parents=True)  # what a run killed before its config.yaml leaves
    (empty / ".lock").write_text("pid 1 on host h")
    rc, _, err = cli(*command("pretrain", empty))
    assert rc == 0, err


def test_the_documented_requeue_command_starts_and_resumes_in_a_folder_holding_the_slurm_log(tmp_path):
    """docs/long-runs.md: `--run_dir R --resume auto` on every (re)start, with SLURM's --output=R/slurm-%j.out."""
    run = tmp_path / "R"
    run.mkdir()
    (run / "slurm-77.out").write_text("job 77 started\n")
    args = pretrain_args(_DATA[0], tmp_path / "logs", run_dir=run, iters=4, save_freq=1)
    rc, out, err = cli(*args, "--resume", "auto", "--stop_after", 2)
    assert rc == 0, err
    assert [p.name for p in ckpt_lib.list_checkpoints(run)][0] == "checkpoint-00000002.pt"
    with open(run / "slurm-77.out", "a") as f:  # the requeued job appends to its log
        f.write("requeued\n")
    rc, out, err = cli(*args, "--resume", "auto")
    assert rc == 0, err
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert "resumed from" in (run / "log.txt").read_text()
    assert (run / "slurm-77.out").read_text() == "job 77 started\nrequeued\n"
