"""Hostile input through the CLI (in this process, real files; real processes for signals and a lock): each
ends in one `error:` line and exit code 2 with nothing written, or, for a signal, a clean stop with the status
recorded."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from tests.conftest import REPO, TRAINED, run_cli, tiny_args


def one_error_line(r) -> str:
    """The one `error:` line of a failed command (a hint how to continue may follow it)."""
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("value, says", [("1000000000000", "must be within [1, 10,000,000]"),
                                         ("1e20", "expects an integer within ±2**63")])  # past int64 already
def test_memory_sized_options_have_ranges(tmp_path, value, says):
    msg = one_error_line(run_cli("pretrain", *tiny_args(tmp_path), "--iters", value))
    assert "option 'iters'" in msg and says in msg
    assert not (tmp_path / "logs").exists()


def test_run_name_cannot_leave_the_root(tmp_path):
    msg = one_error_line(run_cli("pretrain", *tiny_args(tmp_path, name="../escaped")))
    assert "must stay inside --root" in msg
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "logs").exists()


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    # 9 levels of 9 aliases: 9**9 (387 million) strings if anything expanded or printed it
    levels = ['&a ["x","x","x","x","x","x","x","x","x"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        levels.append(f"&{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    (tmp_path / "bomb.yaml").write_text(f"name: [{', '.join(levels)}]\n")
    tracemalloc.start()
    try:
        msg = one_error_line(run_cli("pretrain", "--config", tmp_path / "bomb.yaml"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "option 'name' expects a string" in msg and len(msg) < 200
    assert peak < 50 << 20, peak  # nothing expanded: 387 million strings would take gigabytes


def test_yaml_with_many_aliases_is_refused(tmp_path):
    (tmp_path / "many.yaml").write_text("x: &a 1\nl: [" + ", ".join(["*a"] * 150) + "]\n")
    msg = one_error_line(run_cli("pretrain", "--config", tmp_path / "many.yaml"))
    assert "more than 100 YAML aliases" in msg


def test_duplicate_yaml_keys_are_refused(tmp_path):
    (tmp_path / "dup.yaml").write_text("lr: 0.1\nbatch_size: 32\nlr: 0.5\n")
    msg = one_error_line(run_cli("pretrain", "--config", tmp_path / "dup.yaml"))
    assert "key 'lr' is written twice (line 3)" in msg


def test_errors_say_where_a_bad_key_came_from(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.1\n")
    msg = one_error_line(run_cli("pretrain", "--config", tmp_path / "c.yaml", "--lrr", "1"))
    assert "unknown option 'lrr' (on the command line)" in msg
    (tmp_path / "c.yaml").write_text("lrr: 0.1\n")
    msg = one_error_line(run_cli("pretrain", "--config", tmp_path / "c.yaml"))
    assert f"unknown option 'lrr' (in {tmp_path / 'c.yaml'})" in msg


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_an_evaluation_even_when_sigint_was_ignored(tmp_path, sig):
    """A shell starts background jobs with SIGINT ignored; the entry point installs its handlers anyway. During the
    SGD steps the signal lets the step end and saves the head (tests/test_eval_resume.py resumes it)."""
    root = tmp_path / "logs"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "simclr", "eval", "--encoder_arch", "resnet18", "--encoder_width", "8",
                          "--train_subset", "100", "--test_subset", "50", "--augmentation", "none", "--iters",
                          "10000000", "--batch_size", "16", "--device", "cpu", "--workers", "0", "--root", root,
                          "--name", "e", "--save_freq", "100"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.time() + 300
        status = None
        while time.time() < deadline and p.poll() is None:
            found = list(root.glob("e/*/status.json"))
            if found and list(found[0].parent.glob("checkpoints/linear-head-*.pt")):  # the steps have begun
                status = found[0]
                break
            time.sleep(0.5)
        assert status is not None, "the evaluation did not start"
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-2000:]
    assert "stopping after this step" in err and "Traceback" not in err
    assert "status: interrupted at step" in out and "continue with:" in out
    assert json.loads(status.read_text())["status"] == "interrupted"


def _tampered(trained_ckpt, tmp_path, change) -> Path:
    from simclr import checkpoint as ckpt_lib
    ck = ckpt_lib.read(trained_ckpt)
    change(ck)
    out = tmp_path / "run" / "checkpoints" / "checkpoint-00000009.pt"
    ckpt_lib.save_checkpoint(out, ck)  # a valid card: only the content is hostile
    return out


@pytest.mark.parametrize("change,needle", [
    (lambda ck: ck["model"]["convnet.conv1.weight"].fill_(float("nan")), "non-finite weights (NaN or inf) in "
                                                                          "convnet.conv1.weight"),
    (lambda ck: ck.update(config="resnet18"), "its 'config' is a str"),
    (lambda ck: ck.update(image_size=1000000), "image_size '1000000' is not a side"),
], ids=["nan-weights", "config-string", "huge-image-size"])
def test_hostile_checkpoint_content_is_one_error_everywhere(trained_ckpt, tmp_path, change, needle):
    ck = _tampered(trained_ckpt, tmp_path, change)
    imgs = tmp_path / "imgs" / "a"
    imgs.mkdir(parents=True)
    for commandline in (["embed", "--encoder_ckpt", ck, "--images", imgs.parent, "--out", tmp_path / "f.npy"],
                        ["export", ck, "--out", tmp_path / "e.pth"],
                        ["eval", "--encoder_ckpt", ck, "--train_subset", "50", "--test_subset", "20", "--root",
                         tmp_path / "ev"],
                        ["knn", "--encoder_ckpt", ck, "--train_subset", "50", "--test_subset", "20",
                         "--root", tmp_path / "ev"]):
        msg = one_error_line(run_cli(*commandline))
        assert needle in msg, (commandline[0], msg)
    assert not (tmp_path / "f.npy").exists() and not (tmp_path / "e.pth").exists() and not (tmp_path / "ev").exists()


def test_resume_auto_skips_a_foreign_dict_under_a_checkpoint_name(trained_run, tmp_path):
    import torch
    run = trained_run  # finished at step 4
    torch.save({"weights": torch.zeros(3)}, run / "checkpoints" / "checkpoint-00000005.pt")
    r = run_cli("pretrain", *tiny_args(tmp_path, **dict(TRAINED, iters=5)),
                "--run_dir", run, "--resume", "auto", "--allow_config_change", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping checkpoint-00000005.pt: not a checkpoint of this project" in r.stderr
    assert "at step 4" in (run / "log.txt").read_text()  # the older valid one
    assert "status: finished at step 5" in r.stdout


def test_a_fifo_named_like_an_image_is_skipped_not_waited_for(tmp_path, data_root):
    import shutil
    for c in ("cat", "dog"):
        (tmp_path / "d" / "train" / c).mkdir(parents=True)
        (tmp_path / "d" / "test" / c).mkdir(parents=True)
        for f in sorted((data_root / "cifar10" / "train" / c).iterdir())[:16]:
            shutil.copy(f, tmp_path / "d" / "train" / c / f.name)
        for f in sorted((data_root / "cifar10" / "test" / c).iterdir())[:8]:
            shutil.copy(f, tmp_path / "d" / "test" / c / f.name)
    os.mkfifo(tmp_path / "d" / "train" / "cat" / "zz.jpg")
    r = run_cli("pretrain", *tiny_args(tmp_path, data="folder", data_path=tmp_path / "d", image_size=32,
                                       train_subset=0, test_subset=0, batch_size=8, iters=1, knn_k=5), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # a counted skip with a warning (also in log.txt, metrics.jsonl and status.json)
    assert f"warning: skipped 1 unreadable image file(s), e.g. {tmp_path / 'd' / 'train' / 'cat' / 'zz.jpg'}" \
        in r.stderr
    (run,) = [p.parent for p in (tmp_path / "logs").glob("t/*/status.json")]
    assert json.loads((run / "status.json").read_text())["metrics"]["skipped_images"] == 1
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["skipped_images"] == 1


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_really_full_disk_during_a_save_is_one_error_and_loses_nothing(tmp_path):
    """A real full file system (a small tmpfs; torch's zip writer reports it as a RuntimeError, not ENOSPC).
    Needs root to mount: CI runs as root; elsewhere the test is skipped with the reason."""
    from simclr import checkpoint as ckpt_lib
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _tmpfs(disk, "4m"):
        pytest.skip("needs root and tmpfs to fill a real disk")
    try:
        r = run_cli("pretrain", *tiny_args(disk, iters=8, save_freq=1, keep_last=10, train_subset=128,
                                           test_subset=50, log_freq=100))
        msg = one_error_line(r)
        assert "disk full while" in msg and "intact" in msg
        (run,) = [p.parent for p in (disk / "logs").glob("t/*/status.json")]
        saved = ckpt_lib.list_checkpoints(run)
        assert saved, "some checkpoints fit before the disk filled"
        good = ckpt_lib.latest_valid(run)
        assert good == saved[0]  # every checkpoint under a real name is complete and verified
        assert not [p for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]  # no temp file left
        step = ckpt_lib.read(good)["step"]
        assert 1 <= step < 8
    finally:
        # lazy: a descriptor left open must not keep it mounted
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_second_writer_of_a_run_folder_is_refused_naming_the_holder(tmp_path):
    import socket
    run = tmp_path / "run"
    args = ["pretrain", *tiny_args(tmp_path, iters=400, log_freq=1, train_subset=128, test_subset=50),
            "--run_dir", str(run), "--resume", "auto"]
    first = subprocess.Popen([sys.executable, "-m", "simclr", *args], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (run / "metrics.jsonl").exists() and first.poll() is None:
            time.sleep(0.5)
        assert first.poll() is None, first.communicate()[1][-3000:]
        metrics_before = (run / "metrics.jsonl").read_text()
        second = run_cli(*args)
        msg = one_error_line(second)
        assert f"is in use by pid {first.pid} on host {socket.gethostname()}" in msg
        # the second writer touched nothing of the first's: its metrics only grew, one run's steps in order
        steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()
                 if '"loss"' in ln]
        assert (run / "metrics.jsonl").read_text().startswith(metrics_before) and steps == sorted(set(steps))
    finally:
        first.kill()
        first.communicate()
    # killed (-9): its lock went with it, so the run can be continued at once
    r = run_cli("pretrain", "--resume", run, "--iters", "400", "--stop_after", "1")
    assert r.returncode == 0, r.stderr[-3000:]


def test_garbage_lines_in_metrics_jsonl_are_skipped_and_counted_by_simclr_runs(trained_run, tmp_path):
    root = tmp_path / "logs"
    run = trained_run  # under root
    good = (run / "metrics.jsonl").read_text()
    records = [json.loads(ln) for ln in good.splitlines()]
    last_loss = [r["loss"] for r in records if "loss" in r][-1]
    knn = [r["knn_top1"] for r in records if "knn_top1" in r][-1]
    garbage = ['{"step": 1e999, "loss": 1.0}',       # inf, as a crashed writer once left it
               '{"step": 2, "loss": NaN, "lr": 0.1}', '{"step": "x", "loss": "abc"}', '["loss", 1]', '"loss"',
               '{"step": 2, "knn_top1": Infinity}', '{"step": 1e999}', '{"step": 3, "loss": 0.']  # truncated
    (run / "metrics.jsonl").write_text(good + "\n".join(garbage))
    r = run_cli("runs", "--root", root, "--columns", "id,status,steps,loss,knn,metrics_skipped")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    (row,) = r.stdout.splitlines()[1:]  # the run's row, its values from the good lines
    assert row.split() == [run.name, "finished", "4/4", f"{last_loss:.4g}", f"{knn:.4g}", "7"]
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    # the summary reads the lines with a loss (from the end) and the kNN lines: 7 of the 8 are among them
    assert len(warnings) == 1 and f"{run}/metrics.jsonl: skipped 7 unreadable" in warnings[0], r.stderr
    r = run_cli("report", run, "--no_pictures")  # the figures read the same file
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_a_report_folder_that_is_a_symlink_is_refused_and_its_target_untouched(trained_run, tmp_path):
    run = trained_run
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "mine.png").write_bytes(b"a picture of the user's")  # a stale-picture sweep would delete it
    (run / "report").symlink_to(outside)
    msg = one_error_line(run_cli("report", run, "--no_pictures"))
    assert f"{run / 'report'} is a symbolic link" in msg and "--out" in msg
    assert [p.name for p in outside.iterdir()] == ["mine.png"]
    assert (outside / "mine.png").read_bytes() == b"a picture of the user's"
    assert (run / "report").is_symlink() and not (run / "report.html").exists()


def _flip_inside_a_tensor(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor's data (not the zip's headers)."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    at = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_card_less_checkpoint_is_caught_on_resume_and_never_gets_a_card(trained_run,
                                                                                            tmp_path):
    """Card deleted, one byte of tensor data flipped: --resume auto names it and takes the previous
    checkpoint; re-saving that step writes a new file whose card vouches for it, not for the corrupt bytes."""
    import torch

    from simclr import checkpoint as ckpt_lib
    from simclr.files import sha256_file
    run = trained_run
    ck2 = ckpt_lib.checkpoint_path(run, 4)  # the newest
    original = ckpt_lib.read(ck2)
    ck2.with_suffix(".json").unlink()
    _flip_inside_a_tensor(ck2)
    bad_sha = sha256_file(ck2)
    r = run_cli("pretrain", *tiny_args(tmp_path, **TRAINED), "--run_dir", run, "--resume", "auto")  # the command
    assert r.returncode == 0, r.stderr[-3000:]  # that made the run
    assert "skipping checkpoint-00000004.pt" in r.stderr and "truncated or corrupt" in r.stderr
    assert "at step 3" in (run / "log.txt").read_text()
    card = json.loads(ck2.with_suffix(".json").read_text())
    assert card["sha256"] == sha256_file(ck2) != bad_sha
    assert not [c for c in (run / "checkpoints").glob("*.json") if bad_sha in c.read_text()]
    again = ckpt_lib.read(ck2)  # the step redone from checkpoint 1 is the step that was lost
    assert all(torch.equal(again["model"][k], original["model"][k]) for k in original["model"])


def test_a_folder_under_the_next_checkpoints_name_is_one_error_and_loses_nothing(trained_run, tmp_path):
    from simclr import checkpoint as ckpt_lib
    run = trained_run  # finished at step 4
    in_the_way = ckpt_lib.checkpoint_path(run, 5)
    in_the_way.mkdir()
    (in_the_way / "notes.txt").write_text("the user's")
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir() if p.is_file()}
    status = (run / "status.json").read_bytes()
    r = run_cli("pretrain", "--resume", run, "--iters", "6", "--allow_config_change", "true", "--keep_last", "1")
    msg = one_error_line(r)
    # refused by the run-folder check before any step: nothing of the run is rewritten, its status included
    assert str(in_the_way) in msg and "a folder" in msg and "move it aside" in msg
    assert (in_the_way / "notes.txt").read_text() == "the user's"
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir() if p.is_file()} == before
    assert (run / "status.json").read_bytes() == status
    # under an older name, the pruning of --keep_last passes over it (an unlink would raise IsADirectoryError)
    in_the_way.rename(ckpt_lib.checkpoint_path(run, 0))
    ckpt_lib.prune(run, keep_last=1)
    assert (ckpt_lib.checkpoint_path(run, 0) / "notes.txt").read_text() == "the user's"
    assert [p.name for p in ckpt_lib.list_checkpoints(run)] == ["checkpoint-00000004.pt"]
