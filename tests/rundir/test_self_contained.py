"""A run folder is one self-contained unit, replayed through the real CLI on real files (in this process):
links inside it are refused, a copy resumes as itself, --ckpt branches into a new folder, folders have kinds,
a folder that is not a run is not adopted, and a reader's checkpoint is not pruned under it."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers.folder_runs import cli, knn_args, one_error, pretrain_args, tiny_data_setup, tree_digest
from simclr import checkpoint as ckpt_lib
from simclr.checkpoint import reader as ckpt_reader

_DATA: list = []


_setup = tiny_data_setup(_DATA)


def pretrain(root: Path, **over) -> tuple[int, str, str]:
    return cli(*pretrain_args(_DATA[0], root, **over))


def one_run(tmp_path: Path, **over) -> Path:
    rc, out, err = pretrain(tmp_path / "logs", **over)
    assert rc == 0, err
    (run,) = [p for p in (tmp_path / "logs" / "t").iterdir() if p.is_dir()]
    return run


def steps(run: Path) -> list:
    return [int(ckpt_lib.CKPT_RE.search(p.name).group(1)) for p in ckpt_lib.list_checkpoints(run)]


@pytest.mark.parametrize("name", [".lock", "log.txt", "metrics.jsonl"])
def test_a_symlinked_run_file_is_refused_and_its_target_untouched(tmp_path, name):
    """Observation: .lock / log.txt / metrics.jsonl symlinks were followed on resume (the lock's target
    truncated, log lines appended to a shell rc file)."""
    run = one_run(tmp_path, iters=4, stop_after=2)
    victim = tmp_path / "bashrc"
    victim.write_text("export PATH=/usr/bin\n")
    (run / name).unlink()
    (run / name).symlink_to(victim)
    rc, _, err = pretrain(tmp_path / "logs", resume=run)
    one_error(rc, err, "is a symlink", name)
    assert victim.read_text() == "export PATH=/usr/bin\n"
    assert steps(run) == [2, 1]


def test_a_symlinked_checkpoints_folder_is_refused_and_the_other_runs_checkpoints_untouched(tmp_path):
    """Observation: a checkpoints/ symlink made the run train from, overwrite and prune another run's files."""
    other = one_run(tmp_path / "o", iters=6, stop_after=3)  # the same config: its checkpoints fit
    run = one_run(tmp_path, iters=6, stop_after=1)
    before = tree_digest(other)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(other / "checkpoints")
    rc, _, err = pretrain(tmp_path / "logs", resume=run, iters=6)
    one_error(rc, err, "is a symlink", "checkpoints")
    assert tree_digest(other) == before


def test_a_symlinked_checkpoint_file_is_refused(tmp_path):
    other = one_run(tmp_path / "o", iters=6, stop_after=3)
    before = tree_digest(other)
    run = one_run(tmp_path, iters=6, stop_after=1)
    for p in list((run / "checkpoints").iterdir()):
        p.unlink()
    (run / "checkpoints" / "checkpoint-00000003.pt").symlink_to(ckpt_lib.checkpoint_path(other, 3))
    rc, _, err = pretrain(tmp_path / "logs", resume=run, iters=6)
    one_error(rc, err, "is a symlink", "checkpoint-00000003.pt")
    assert tree_digest(other) == before


def test_a_fifo_where_the_log_goes_is_refused_without_blocking(tmp_path):
    run = one_run(tmp_path, iters=4, stop_after=2)
    (run / "log.txt").unlink()
    os.mkfifo(run / "log.txt")
    rc, _, err = pretrain(tmp_path / "logs", resume=run)
    one_error(rc, err, "log.txt", "special file")


def test_a_copied_run_resumes_as_the_copy_and_never_touches_the_original(tmp_path):
    """Observation: a run copied from A to B and resumed as B trained into A (config.yaml named A)."""
    a = tmp_path / "A"
    rc, _, err = pretrain(tmp_path / "logs", iters=4, stop_after=2, run_dir=a)
    assert rc == 0, err
    b = tmp_path / "disk2" / "B"
    shutil.copytree(a, b)
    before = tree_digest(a)
    rc, out, err = cli("pretrain", "--resume", b)
    assert rc == 0, err
    assert f"run folder: {b}" in out
    assert steps(b) == [4, 3]
    assert tree_digest(a) == before
    assert yaml.safe_load((b / "config.yaml").read_text())["run_dir"] == ""  # its location is not recorded


def test_resume_after_a_ckpt_continuation_continues_instead_of_restarting_from_the_file(tmp_path):
    """Observation: --resume RUN after one continuation with --ckpt FILE restarted from FILE every time."""
    a = one_run(tmp_path, iters=6, stop_after=2)
    origin = ckpt_lib.checkpoint_path(a, 2)
    rc, out, err = pretrain(tmp_path / "logs", iters=6, stop_after=2, ckpt=origin, run_dir=tmp_path / "B")
    assert rc == 0, err
    b = tmp_path / "B"
    assert steps(b) == [4, 3]
    assert yaml.safe_load((b / "config.yaml").read_text())["ckpt"] == str(origin.resolve())  # its origin
    rc, out, err = cli("pretrain", "--resume", b, "--stop_after", "1")
    assert rc == 0, err
    assert steps(b) == [5, 4], "the second --resume must continue from step 4, not restart from the origin"
    log = (b / "log.txt").read_text()
    assert f"resumed from {ckpt_lib.checkpoint_path(b, 4)} at step 4" in log


def test_branching_from_an_older_checkpoint_writes_a_new_folder_and_leaves_the_original(tmp_path):
    """Observation: --ckpt + --allow_config_change wrote into the original run folder, overwriting its final
    checkpoint and pruning its origin."""
    a = one_run(tmp_path, iters=4, keep_last=3)
    before = tree_digest(a)
    rc, out, err = pretrain(tmp_path / "logs", iters=4, lr=0.1, allow_config_change="true",
                            ckpt=ckpt_lib.checkpoint_path(a, 2))
    assert rc == 0, err
    assert tree_digest(a) == before
    (new,) = [p for p in (tmp_path / "logs" / "t").iterdir() if p != a]
    assert steps(new) == [4, 3]
    assert "resumed from" in (new / "log.txt").read_text()
    assert yaml.safe_load((new / "config.yaml").read_text())["ckpt"] == str(ckpt_lib.checkpoint_path(a, 2).resolve())


def test_knn_into_a_pretraining_run_folder_is_refused_before_any_work(tmp_path):
    """Observation: `simclr knn --run_dir R` with R a pretraining run overwrote R's config.yaml/status.json."""
    a = one_run(tmp_path, iters=4, stop_after=2)
    before = tree_digest(a)
    rc, _, err = cli(*knn_args(_DATA[0], tmp_path / "logs", a, run_dir=a))
    one_error(rc, err, "pretrain run folder", "--run_dir")
    assert tree_digest(a) == before
    rc, _, err = pretrain(tmp_path / "logs", resume=a)  # and the run still resumes
    assert rc == 0, err
    assert steps(a) == [4, 3]


def test_resume_auto_skips_a_newer_evaluation_folder_of_the_same_name(tmp_path):
    """Observation: --resume auto picked a newer evaluation folder of the same name and restarted from step 0
    inside it."""
    a = one_run(tmp_path, iters=4, stop_after=2)
    rc, _, err = cli(*knn_args(_DATA[0], tmp_path / "logs", a))
    assert rc == 0, err
    (ev,) = [p for p in (tmp_path / "logs" / "t").iterdir() if p != a]
    assert json.loads((ev / "status.json").read_text())["kind"] == "knn"
    rc, out, err = pretrain(tmp_path / "logs", resume="auto")
    assert rc == 0, err
    assert f"run folder: {a}" in out
    assert steps(a) == [4, 3] and not ckpt_lib.list_checkpoints(ev)


def test_resume_of_a_folder_that_is_not_a_run_is_refused_and_names_the_newest_run_in_it(tmp_path):
    """`simclr pretrain --resume logs/tiny` (the name folder) started a new default run inside it."""
    a = one_run(tmp_path, iters=4, stop_after=2)
    name_folder = tmp_path / "logs" / "t"
    before = sorted(p.name for p in name_folder.iterdir())
    rc, _, err = cli("pretrain", "--resume", name_folder)
    one_error(rc, err, "not a run folder", f"--resume {a}")
    assert sorted(p.name for p in name_folder.iterdir()) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = cli("pretrain", "--resume", empty)
    one_error(rc, err, "not a run folder")
    assert not any(empty.iterdir())


def test_a_checkpoint_being_read_is_not_pruned_under_the_reader(tmp_path, monkeypatch):
    """Observation: evaluating a run while it trains raced with pruning (valid files called corrupt, then
    'no valid checkpoint' or a FileNotFoundError traceback). Replayed deterministically: the trainer saves a
    newer checkpoint and prunes exactly while `simclr knn RUN` is reading the newest one."""
    a = one_run(tmp_path, iters=2, keep_last=1)
    newest = ckpt_lib.checkpoint_path(a, 2)
    real_read_card = ckpt_reader.read_card  # what read() calls, where it calls it
    pruned = []

    def trainer_saves_and_prunes_meanwhile(path):
        if not pruned:
            pruned.append(True)
            for src, dst in ((newest, ckpt_lib.checkpoint_path(a, 3)),
                             (newest.with_suffix(".json"), ckpt_lib.checkpoint_path(a, 3).with_suffix(".json"))):
                shutil.copy(src, dst)
            ckpt_lib.prune(a, 1)  # what the training process does after each save
        return real_read_card(path)

    monkeypatch.setattr(ckpt_reader, "read_card", trainer_saves_and_prunes_meanwhile)
    rc, out, err = cli(*knn_args(_DATA[0], tmp_path / "logs", a, name="ev"))
    assert rc == 0, err
    assert "skipping" not in err and "corrupt" not in err
    assert pruned and newest.exists(), "the checkpoint being read must survive the trainer's prune"
    ckpt_lib.prune(a, 1)  # once read, the next save's prune removes it
    assert steps(a) == [3]


def test_a_run_dir_that_holds_files_of_its_own_is_refused_for_every_kind_of_run(tmp_path):
    """`--run_dir` naming an existing folder that is no run (a project, the runs' name folder) wrote config.yaml,
    env.json, log.txt ... over and among its files: a user's env.json was replaced, their log.txt appended to."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine\n")
    (project / "env.json").write_text('{"conda": "mine"}')
    (project / "log.txt").write_text("my log\n")
    before = tree_digest(project)
    rc, _, err = pretrain(tmp_path / "logs", run_dir=project)
    one_error(rc, err, str(project), "env.json", "--run_dir")  # a file the run would write over (notes.txt is none)
    a = one_run(tmp_path, iters=2)
    rc, _, err = cli(*knn_args(_DATA[0], tmp_path / "logs", a, run_dir=project))
    one_error(rc, err, "env.json", "--run_dir")
    assert tree_digest(project) == before and sorted(p.name for p in project.iterdir()) == [
        "env.json", "log.txt", "notes.txt"]
    names = tmp_path / "logs" / "t"  # the name folder holding run a
    rc, _, err = pretrain(tmp_path / "logs", run_dir=names)
    one_error(rc, err, a.name)
    assert [p.name for p in names.iterdir()] == [a.name]
    empty = tmp_path / "empty"  # a new or empty folder is what --run_dir is for
    empty.mkdir()
    rc, _, err = pretrain(tmp_path / "logs", run_dir=empty, iters=2)
    assert rc == 0, err
    assert steps(empty) == [2, 1]


def test_a_hard_link_snapshot_resumed_never_changes_the_original(tmp_path):
    """A run copied with `cp -al` (hard links) and resumed appended its metrics, log and invocations to the
    original's files, which are the same inodes."""
    a = one_run(tmp_path, iters=4, stop_after=2)
    b = tmp_path / "snapshot" / "b"
    shutil.copytree(a, b, copy_function=os.link)
    assert os.stat(b / "log.txt").st_nlink == 2
    before = tree_digest(a)
    rc, _, err = pretrain(tmp_path / "logs", resume=b)
    assert rc == 0, err
    assert tree_digest(a) == before
    assert steps(b) == [4, 3] and len((b / "metrics.jsonl").read_text()) > len((a / "metrics.jsonl").read_text())


def test_prune_leaves_files_that_only_look_like_checkpoints(tmp_path):
    """Pruning deleted a user's keep-checkpoint-00000001.pt (the name pattern was not anchored) and any
    checkpoint-*.json without a .pt beside it, whoever wrote it."""
    a = one_run(tmp_path, iters=4, stop_after=2)
    ck = a / "checkpoints"
    shutil.copy(ck / "checkpoint-00000001.pt", ck / "keep-checkpoint-00000001.pt")
    (ck / "checkpoint-summary.json").write_text('{"mine": 1}')
    (ck / "checkpoint-00000099.json").write_text('{"mine": 2}')
    rc, _, err = pretrain(tmp_path / "logs", resume=a)
    assert rc == 0, err
    assert steps(a) == [4, 3]
    assert (ck / "keep-checkpoint-00000001.pt").is_file()
    assert (ck / "checkpoint-summary.json").read_text() == '{"mine": 1}'
    assert (ck / "checkpoint-00000099.json").read_text() == '{"mine": 2}'


def test_a_run_folder_inside_its_own_data_is_refused(tmp_path, trained_ckpt):
    """`--run_dir DATA/train/myrun` trained, and the run folder became a class `myrun` of the data: the report's
    pictures its images, the next resume and kNN refused for classes that differ."""
    data = Path(shutil.copytree(_DATA[0], tmp_path / "data"))
    before = tree_digest(data)
    rc, _, err = cli(*pretrain_args(data, tmp_path / "logs", run_dir=data / "train" / "myrun", iters=2))
    one_error(rc, err, "inside the data folder", "--run_dir")
    rc, _, err = cli(*knn_args(data, data / "runs", trained_ckpt))  # --root inside the data, for an evaluation
    one_error(rc, err, "inside the data folder", "--root")
    assert tree_digest(data) == before and sorted(p.name for p in data.iterdir()) == ["test", "train"]
