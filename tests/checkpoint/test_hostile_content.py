"""Hostile checkpoint content and a hostile disk, through the CLI (in this process, real files): a valid card over
hostile content, a foreign dict or a corrupt card-less file under a checkpoint's name, a folder in the way of the
next checkpoint, a really full disk. Each ends in one `error:` line and exit code 2 with nothing lost, or in a
resume that passes over the bad file."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TRAINED, run_cli, tiny_args
from tests.helpers.folder_runs import one_error_line


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
