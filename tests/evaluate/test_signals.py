"""A signal stops an evaluation (a real process: the signal is the point) with the status recorded."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # a real process or a long wait: `make test` runs it, `make test-fast` leaves it out
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_an_evaluation_even_when_sigint_was_ignored(tmp_path, sig):
    """A shell starts background jobs with SIGINT ignored; the entry point installs its handlers anyway. During the
    SGD steps the signal lets the step end and saves the head (tests/evaluate/test_resume.py resumes it)."""
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
