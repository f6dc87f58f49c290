"""The loss seam end to end (simclr.loss through ``simclr pretrain``): ``--loss dcl`` trains and resumes exactly, a
resume with another loss is refused, and a loss registered from outside the package (docs/extending.md's worked
example, run from the page itself) is the one a run trains with."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import REPO, run_cli, tiny_args
from simclr import config as config_lib
from simclr import loss as loss_mod
from simclr.checkpoint import list_checkpoints
from simclr.checkpoint import read as read_checkpoint
from simclr.options import PretrainConfig
from simclr.runs import read_metrics
from tests.loss.test_naive_loop import naive_dcl, naive_nt_xent

# a width-8 ResNet-18 on 64 CIFAR-10 images, 2 steps of 16 images
TINY = dict(iters=2, train_subset=64, test_subset=64, batch_size=16, save_freq=1, keep_last=5, deterministic="true")


def _losses(run) -> list:
    return [m["loss"] for m in read_metrics(run) if "loss" in m]


def _first_step_z(tmp_path, **over) -> torch.Tensor:
    """The projections the first step of ``tiny_args(**over)`` scores: the same seeded model and first batch, built
    by the training's own set-up in a folder of its own (the generators it seeds are put back afterwards)."""
    from simclr.train import setup
    args = tiny_args(tmp_path, **dict(over, run_dir=tmp_path / "probe", deterministic="false"))
    cfg, _ = config_lib.parse(PretrainConfig, args)
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    s = setup(cfg)
    try:
        x, _ = next(iter(s.parts.loader.batches(0, 1)))
        with torch.no_grad():
            return s.parts.model(x)["z"].double()
    finally:
        s.run.close()
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def test_dcl_trains_two_steps_and_resumes_exactly(tmp_path, data_root):
    full, part = tmp_path / "full", tmp_path / "part"
    r = run_cli("pretrain", *tiny_args(tmp_path, **TINY, loss="dcl", run_dir=full))
    assert r.returncode == 0, r.stderr[-3000:]
    assert yaml.safe_load((full / "config.yaml").read_text())["loss"] == "dcl"
    # the first step's loss is DCL's on that step's projections (NT-Xent's would be larger)
    z = _first_step_z(tmp_path, **TINY, loss="dcl")
    assert _losses(full)[0] == pytest.approx(naive_dcl(z, 0.5, 2).item(), rel=1e-4)
    assert _losses(full)[0] < naive_nt_xent(z, 0.5, 2).item() - 1e-3

    r = run_cli("pretrain", *tiny_args(tmp_path, **TINY, loss="dcl", run_dir=part, stop_after=1))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((part / "status.json").read_text())["status"] == "interrupted"
    # another loss is another trajectory: refused, nothing written
    r = run_cli("pretrain", "--resume", part, "--loss", "nt-xent")
    assert r.returncode == 2 and "loss: 'dcl' -> 'nt-xent'" in r.stderr and "--allow_config_change" in r.stderr
    assert [p.name for p in list_checkpoints(part)] == ["checkpoint-00000001.pt"]
    r = run_cli("pretrain", "--resume", part)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(part) == _losses(full) and len(_losses(full)) == 2
    wa, wb = (read_checkpoint(list_checkpoints(run)[0]) for run in (full, part))
    assert wa["step"] == wb["step"] == 2
    for k, v in wa["model"].items():
        assert torch.equal(v, wb["model"][k]), k


def _extending_example() -> str:
    """The worked example of docs/extending.md ("A loss"), as the page shows it."""
    page = (REPO / "docs" / "extending.md").read_text()
    (code,) = re.findall(r"<!-- tested: tests/loss/test_in_training.py -->\n```python\n(.*?)```", page, re.S)
    return code


def test_extending_example_loss_is_the_one_a_run_trains_with(tmp_path, data_root, monkeypatch):
    """docs/extending.md's toy loss, registered from outside the package, drives a normal 2-step ``simclr
    pretrain``: every step called it (steps 0 and 1), the logged losses are what it returned, and it is the
    annealed NT-Xent the page says (temperature 2T at step 0)."""
    monkeypatch.setattr(loss_mod, "LOSSES", dict(loss_mod.LOSSES))  # the registration ends with the test
    example = _extending_example()
    exec(compile(example, "docs/extending.md", "exec"), {"__name__": "extending_example"})
    factory, seen = loss_mod.LOSSES["nt-xent-warm"], []

    def spy(cfg):
        criterion = factory(cfg)

        def recorded(z, step):
            loss, acc = criterion(z, step)
            seen.append((step, z.detach().double().clone(), loss.item()))
            return loss, acc
        return recorded

    loss_mod.LOSSES["nt-xent-warm"] = spy
    r = run_cli("pretrain", *tiny_args(tmp_path, **TINY, loss="nt-xent-warm", run_dir=tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [step for step, _, _ in seen] == [0, 1]
    assert _losses(tmp_path / "run") == pytest.approx([value for _, _, value in seen], rel=1e-6)
    assert seen[0][2] == pytest.approx(naive_nt_xent(seen[0][1], 2 * 0.5, 2).item(), rel=1e-5)
    assert seen[1][2] == pytest.approx(naive_nt_xent(seen[1][1], 1.5 * 0.5, 2).item(), rel=1e-5)
    # unregistered, the name is refused with the way to make it known
    loss_mod.LOSSES.pop("nt-xent-warm")
    r = run_cli("pretrain", *tiny_args(tmp_path, loss="nt-xent-warm"))
    assert r.returncode == 2 and "register_loss" in r.stderr
