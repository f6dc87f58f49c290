"""A run folder's name stays inside --root, and its lock refuses a second writer (a real process holds it),
naming the holder; each refusal is one `error:` line and exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run_cli, tiny_args
from tests.helpers.folder_runs import one_error_line


def test_run_name_cannot_leave_the_root(tmp_path):
    msg = one_error_line(run_cli("pretrain", *tiny_args(tmp_path, name="../escaped")))
    assert "must stay inside --root" in msg
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "logs").exists()


@pytest.mark.slow  # a real process or a long wait: `make test` runs it, `make test-fast` leaves it out
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
