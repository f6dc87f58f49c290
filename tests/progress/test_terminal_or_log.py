"""One progress rule: a bar on a terminal, timestamped lines elsewhere, a line before a long phase."""
from __future__ import annotations

import io
import re

from tests.conftest import run_cli, tiny_args

from simclr import progress

STAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_bar_is_timestamped_lines_without_carriage_returns():
    out = io.StringIO()
    with progress.Progress(4, "linear head", file=out, every=0) as bar:
        for _ in range(4):
            bar.update()
        bar.set_postfix(loss="0.5")
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines and all(STAMPED.match(ln) for ln in lines)
    assert "linear head: 4/4 (100%)" in lines[-1]


def test_on_a_terminal_it_is_a_bar_and_disabled_it_is_silent():
    tty = _Terminal()
    with progress.Progress(3, "features", file=tty) as bar:
        bar.update(3)
    assert "\r" in tty.getvalue() and "3/3" in tty.getvalue()
    quiet = io.StringIO()
    with progress.Progress(3, "features", enabled=False, file=quiet, every=0) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""


def test_messages_are_timestamped_off_a_terminal():
    out = io.StringIO()
    progress.line("hello", out)
    assert STAMPED.match(out.getvalue()) and out.getvalue().endswith("hello\n")


def test_an_eval_into_a_log_file_writes_lines_not_bars(tmp_path, data_root):
    r = run_cli("eval", "--data", "cifar10", "--encoder_arch", "resnet18", "--encoder_width", "8",
                "--train_subset", "200", "--test_subset", "100", "--augmentation", "none", "--iters", "20",
                "--batch_size", "50", "--device", "cpu", "--root", tmp_path / "logs")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr  # no tqdm bars in a redirected log
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and all(STAMPED.match(ln) for ln in lines), lines


def test_the_knn_monitor_says_it_is_starting(tmp_path, data_root):
    r = run_cli("pretrain", *tiny_args(tmp_path, verbose="true", eval_at_start="true"))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    start = [i for i, ln in enumerate(lines) if "kNN monitor: embedding 256 training and 200 test images" in ln]
    result = [i for i, ln in enumerate(lines) if "kNN top-1" in ln]
    assert len(start) == 2 and len(result) == 2  # at random init and after the last step
    assert start[0] < result[0] < start[1] < result[1]
    assert all(STAMPED.match(lines[i]) for i in start)
