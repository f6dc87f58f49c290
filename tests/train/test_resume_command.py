"""The printed `continue with:` line is a command that runs as is, whichever way the user started the job."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest
from pathlib import Path

from tests.conftest import REPO, run_cli, tiny_args

from simclr import cli


def _fake_venv(tmp_path: Path) -> Path:
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "simclr"):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_a_venv_off_path_gets_the_scripts_path(tmp_path, monkeypatch):
    bin_dir = _fake_venv(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setattr(sys, "argv", [str(bin_dir / "simclr"), "pretrain"])
    cmd = shlex.split(cli.resume_command("logs/demo/r1"))
    assert cmd == [".venv/bin/simclr", "pretrain", "--resume", "logs/demo/r1"]
    assert shutil.which(cmd[0]) is not None  # a path with a slash: the shell runs it without PATH


def test_an_activated_venv_gets_the_plain_name(tmp_path, monkeypatch):
    bin_dir = _fake_venv(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setattr(sys, "argv", [str(bin_dir / "simclr")])
    assert cli.resume_command("r") == "simclr pretrain --resume r"


def test_train_py_users_get_the_train_py_form(tmp_path, monkeypatch):
    bin_dir = _fake_venv(tmp_path)
    (tmp_path / "train.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setattr(sys, "argv", ["train.py", "--config", "x.yaml"])
    assert cli.resume_command("logs/x") == ".venv/bin/python ./train.py --resume logs/x"


@pytest.mark.slow  # a real process or a long wait: `make test` runs it, `make test-fast` leaves it out
def test_the_printed_command_runs_without_the_venv_on_path(tmp_path, data_root):
    r = run_cli("pretrain", *tiny_args(tmp_path, stop_after=2))
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("continue with: "))
    cmd = shlex.split(line[len("continue with: "):])
    env = dict(os.environ, PATH="/usr/bin:/bin")  # the venv is not activated, as after `make demo`
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "status: finished at step 4" in done.stdout
