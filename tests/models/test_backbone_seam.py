"""The backbone seam (simclr.names.BACKBONES, simclr.models.register_backbone): docs/extending.md's worked example,
run from the page itself, trains, resumes, is evaluated and exported like a built-in encoder."""
from __future__ import annotations

import re

import pytest
import torch
import yaml

from simclr import checkpoint as ckpt_lib
from simclr import load_encoder, names
from simclr.errors import CheckpointError
from tests.conftest import REPO, run_cli, tiny_args


def _example() -> str:
    page = (REPO / "docs" / "extending.md").read_text()
    (code,) = re.findall(r"<!-- tested: tests/models/test_backbone_seam.py -->\n```python\n(.*?)```", page, re.S)
    return code


def test_the_extending_example_backbone_trains_resumes_evaluates_and_exports(tmp_path, data_root, monkeypatch):
    monkeypatch.setitem(names.BACKBONES, "tiny-convnet", None)  # the example registers it; the test's end drops it
    example = {"__name__": "extending_example"}
    exec(compile(_example(), "docs/extending.md", "exec"), example)
    net = example["TinyConvNet"]
    run = tmp_path / "run"
    args = tiny_args(tmp_path, arch="tiny-convnet", iters=3, stop_after=2, save_freq=1, keep_last=5, run_dir=run)
    args = [a for a in args if a not in ("--width", "8")]  # a ResNet's option, refused for a backbone
    r = run_cli("pretrain", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["arch"] == "tiny-convnet"
    r = run_cli("pretrain", "--resume", run)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = ckpt_lib.read(ckpt_lib.checkpoint_path(run, 3))
    own = {f"convnet.{k}": v.shape for k, v in net().state_dict().items()}
    assert {k: v.shape for k, v in ck["model"].items() if k.startswith("convnet.")} == own  # this network's weights
    # a ResNet's options do not apply to it
    r = run_cli("pretrain", *tiny_args(tmp_path, arch="tiny-convnet", width=8, run_dir=tmp_path / "w"))
    assert r.returncode == 2 and "--width 8 applies to the built-in ResNets" in r.stderr
    r = run_cli("knn", "--encoder_ckpt", run, "--train_subset", "100", "--test_subset", "50", "--device", "cpu",
                "--root", tmp_path / "ev")
    assert r.returncode == 0 and "top-1" in r.stdout, r.stderr[-3000:]
    out = tmp_path / "enc.safetensors"
    r = run_cli("export", run, "--out", out)
    assert r.returncode == 0 and "safetensors, tiny-convnet, 32-d features" in r.stdout, r.stderr[-3000:]
    x = torch.rand(4, 3, 32, 32)
    assert torch.allclose(load_encoder(out)(x), load_encoder(run)(x))  # the export gives the run's features
    monkeypatch.delitem(names.BACKBONES, "tiny-convnet")  # a process that does not know the backbone says what to do
    with pytest.raises(CheckpointError, match="register it first"):
        load_encoder(run)
