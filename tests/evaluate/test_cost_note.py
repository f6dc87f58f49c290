"""Default `simclr eval` on a CPU says at the start what it costs and how to make it fast."""
from __future__ import annotations

from tests.conftest import run_cli

BASE = ("eval", "--data", "cifar10", "--encoder_arch", "resnet18", "--encoder_width", "8", "--train_subset", "100",
        "--test_subset", "50", "--iters", "2", "--batch_size", "16", "--device", "cpu")


def test_on_the_fly_augmentation_on_a_cpu_says_its_cost_first(tmp_path, data_root):
    r = run_cli(*BASE, "--root", tmp_path / "logs")
    assert r.returncode == 0, r.stderr
    err = r.stderr
    note = err.index("note: on the CPU, on-the-fly augmentation encodes 16 images every step, 2 steps")
    assert "--augmentation none" in err[note:] and "--protocol fast-linear" in err[note:]
    assert err.index("first step took") > note  # the measured cost follows the warning
    assert "s: about 0:" in err and "for 2 steps" in err


def test_the_fast_protocol_has_no_such_note(tmp_path, data_root):
    r = run_cli(*BASE, "--augmentation", "none", "--root", tmp_path / "logs")
    assert r.returncode == 0, r.stderr
    assert "note: on the CPU" not in r.stderr and "first step took" not in r.stderr
