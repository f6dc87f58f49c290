"""What one pretraining step reads: the package files and functions that one optimizer step plus one checkpoint
save run, traced with ``sys.setprofile`` (package frames only). A reader following a step should not have to open
more than a dozen files; docs/architecture.md lists them."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

MAX_FILES = 12


def trace_calls(fn) -> dict:
    """{file relative to the package: {function names}} of every package function ``fn()`` calls."""
    import simclr
    root = str(Path(simclr.__file__).parent) + "/"
    seen: dict = {}

    def profile(frame, event, arg):
        name = frame.f_code.co_filename
        if event == "call" and name.startswith(root):
            seen.setdefault(name[len(root):], set()).add(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def test_one_step_and_one_save_stay_within_a_dozen_files(tmp_path, data_root):
    from simclr.config import parse
    from simclr.options import PretrainConfig
    from simclr.train import setup, train_step
    from simclr.train import save as save_checkpoint

    cfg, _ = parse(PretrainConfig, ["--data", "cifar10", "--arch", "resnet18", "--width", "8", "--train_subset", "64",
                                    "--test_subset", "64", "--batch_size", "16", "--iters", "2", "--workers", "0",
                                    "--device", "cpu", "--root", str(tmp_path), "--name", "trace", "--verbose",
                                    "false", "--seed", "0", "--eval_freq", "0", "--save_freq", "0"])
    s = setup(cfg)
    try:
        x, y = next(iter(s.parts.loader.batches(0, 2)))
        before = [p.detach().clone() for p in s.parts.model.parameters()]

        def one_step_and_save():
            train_step(s.parts, x, 0, y=y)
            s.step = 1
            save_checkpoint(s)

        files = trace_calls(one_step_and_save)
    finally:
        s.run.close()
    # the trace saw the real work: parameters moved, a checkpoint exists, the loss and optimizer ran
    assert any(not torch.equal(a, b) for a, b in zip(before, s.parts.model.parameters()))
    assert list((s.run.path / "checkpoints").glob("*.pt"))
    assert "nt_xent" in files.get("loss.py", set()) and "step" in files.get("optim.py", set())
    listing = "\n".join(f"  {f}: {', '.join(sorted(fns))}" for f, fns in sorted(files.items()))
    assert len(files) <= MAX_FILES, f"one step + one save runs {len(files)} package files:\n{listing}"
