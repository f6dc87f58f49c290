"""Spec parity: the spec's six dumped config files, its aliases, sentinels and problems.

The files below hold exactly the spec's keys and values (its configs/*.yaml as dumped by its exman
parser, plus the run-describing keys such dumps carry: id, time, status, tmp, config_file,
model_id: -1, ckpt_iter: -1, number_of_processes, gpu). Each runs for one step on the CPU through
train.py (as a script, in this process) with only shrinking overrides (steps, subsets, width, nodes).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from simclr import config as config_lib
from simclr.data.augment import AugSpec, BatchAugment
from simclr.errors import ConfigError
from simclr.models import SimCLRModel
from simclr.optim import scaled_lr
from simclr.eval_options import EvalConfig
from simclr.options import PretrainConfig

from tests.conftest import REPO, run_cli, run_script, tiny_args

RUN_KEYS = """id: 3549
time: '2020-07-18T00:55:23'
status: fail
model_id: -1
ckpt_iter: -1
number_of_processes: 1
"""

SPEC_FILES = {
    "cifar_train_epochs1000_bs1024.yaml": """arch: ResNet50
aug: true
batch_size: 1024
ckpt: ''
color_dist_s: 0.5
config_file: null
data: cifar
dist: ddp
dist_address: '127.0.0.1:1234'
eval_freq: 4800
iters: 48000
log_freq: 48
lr: 4.0
lr_schedule: warmup-anneal
multiplier: 2
name: 'reproduce-cifar10'
node_rank: 0
opt: lars
problem: sim-clr
root: 'none'
save_freq: 4800
scale_lower: 0.08
seed: -1
sync_bn: true
temperature: 0.5
tmp: false
verbose: true
warmup: 0.01
weight_decay: 1.0e-06
workers: 2
world_size: 1
gpu: 0
""" + RUN_KEYS,
    "cifar_eval.yaml": """arch: linear
aug: true
augmentation: RandomCrop
batch_size: 1024
ckpt: ''
ckpt_iter: -1
config_file: null
data: cifar
dist: dp
dist_address: 127.0.0.1:1234
encode_layer: h
encoder_ckpt: ''
eval_freq: 1000
finetune: false
iters: 80000
log_freq: 100
lr: 0.1
lr_schedule: linear
model_id: -1
n_augs_test: 50
n_augs_train: 10
name: ''
node_rank: 0
opt: sgd
precompute_emb_bs: -1
problem: eval
root: ''
save_freq: 100000000
scale_lower: 0.08
seed: -1
status: fail
test_bs: 1024
tmp: false
warmup: 0.0
weight_decay: 0.0001
workers: 2
world_size: 1

time: '2020-07-18T00:55:23'
id: 3549
number_of_processes: 1
gpu: 0
""",
    "imagenet_train_epochs100_bs512.yaml": """arch: ResNet50
aug: true
batch_size: 512
ckpt: ''
color_dist_s: 1.0
config_file: ''
data: imagenet
dist: ddp
dist_address: '127.0.0.1:1234'
eval_freq: 50040
gpu: 0
iters: 250200
log_freq: 100
lr: 0.6
lr_schedule: warmup-anneal
multiplier: 2
name: imagenet-reproduce
node_rank: 0
opt: lars
problem: sim-clr
root: ''
save_freq: 12510
scale_lower: 0.08
seed: -1
sync_bn: true
temperature: 0.1
tmp: false
verbose: true
warmup: 0.1
weight_decay: 1.0e-06
workers: 8
world_size: 1
""" + RUN_KEYS,
    "imagenet_train_epochs200_bs2k.yaml": """arch: ResNet50
aug: true
batch_size: 2048
ckpt: ''
color_dist_s: 1.0
config_file: ''
data: imagenet
dist: ddp
dist_address: ''
eval_freq: 12510
gpu: 0
iters: 125100
log_freq: 100
lr: 2.4
lr_schedule: warmup-anneal
momentum: 0.9
multiplier: 2
name: imagenet-reproduce
node_rank: 0
number_of_processes: 16
opt: lars
problem: sim-clr
root: ''
save_freq: 12510
scale_lower: 0.08
seed: -1
sync_bn: true
temperature: 0.1
tmp: false
verbose: true
warmup: 0.1
weight_decay: 1.0e-06
workers: 8
world_size: 4
id: 17
time: '2020-07-18T00:55:23'
status: done
model_id: -1
ckpt_iter: -1
""",
    "imagenet_train_epochs600_bs2k.yaml": """arch: ResNet50
aug: true
batch_size: 2048
ckpt: ''
color_dist_s: 1.0
config_file: ''
data: imagenet
dist: ddp
dist_address: ''
eval_freq: 12510
gpu: 0
iters: 375300
log_freq: 100
lr: 2.4
lr_schedule: warmup-anneal
multiplier: 2
name: imagenet-reproduce
node_rank: 0
opt: lars
problem: sim-clr
root: ''
save_freq: 12510
scale_lower: 0.08
seed: -1
sync_bn: true
temperature: 0.1
tmp: false
verbose: true
warmup: 0.1
weight_decay: 1.0e-06
workers: 8
world_size: 4
""" + RUN_KEYS,
    "imagenet_eval.yaml": """arch: linear
aug: true
augmentation: RandomResizedCrop
batch_size: 4096
ckpt: ''
ckpt_iter: -1
config_file: null
data: imagenet
dist: dp
dist_address: ''
encode_layer: h
encoder_ckpt: ''
eval_freq: 100
finetune: false
iters: 28080
log_freq: 1000
lr: 1.6
lr_schedule: linear
model_id: -1
name: eval_imagenet_newmodels
node_rank: 0
opt: sgd
precompute_emb_bs: -1
problem: eval
save_freq: 10000000000000000
scale_lower: 0.08
seed: -1
test_bs: 4096
tmp: false
warmup: 0.0
weight_decay: 0.0
workers: 20
world_size: 1
id: 3551
time: '2020-07-19T00:55:23'
status: done
number_of_processes: 1
gpu: 0
""",
}

IMAGENETTE = Path(os.environ["DATA_ROOT"]) / "imagenette-mini"
# shrinking only: one step, a few images, a narrow network, one node, the CPU
SHRINK = ["--iters", "1", "--train_subset", "64", "--test_subset", "40", "--workers", "0", "--device", "cpu",
          "--seed", "0"]
PRETRAIN_SHRINK = SHRINK + ["--width", "8", "--batch_size", "16", "--world_size", "1", "--verbose", "false"]


def _env() -> dict:
    env = dict(os.environ)
    if not env.get("IMAGENET_PATH"):
        env["IMAGENET_PATH"] = str(IMAGENETTE)  # ImageNet's train/ + val/ layout, 10 classes
    return env


def _imagenet_size(name: str) -> list:
    return ["--image_size", "64"] if "imagenet" in name else []


def _write(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text(SPEC_FILES[name])
    return path


def _train_py(*args):
    """``python train.py ...`` (the spec's entry point), run as a script in this process."""
    return run_script(REPO / "train.py", *args, env=_env())


@pytest.fixture(scope="module")
def encoders(tmp_path_factory, trained_ckpt, data_root) -> dict:
    """Tiny encoders: conftest's session run on CIFAR-10, and one pretrained for 2 steps on the
    ImageNet-layout folder (64 px)."""
    tmp = tmp_path_factory.mktemp("enc-imagenet")
    r = run_cli("pretrain", *tiny_args(tmp, data="imagenet", iters=2, batch_size=16, train_subset=64,
                                       test_subset=40), "--image_size", "64", env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    (imagenet,) = sorted((tmp / "logs").glob("t/*/checkpoints/checkpoint-*.pt"))
    return {"cifar": trained_ckpt, "imagenet": imagenet}


# --------------------------------------------------------------------------------------------
# parsing: every file loads; keys, aliases, sentinels
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SPEC_FILES))
def test_spec_file_loads_with_one_note_for_run_keys(tmp_path, name):
    path = _write(tmp_path, name)
    schema = EvalConfig if "eval" in name else PretrainConfig
    cfg, notes = config_lib.parse(schema, ["--config", str(path)])
    run_notes = [n for n in notes if "describe a past run" in n]
    assert len(run_notes) == 1, notes
    for key in ("id", "time", "tmp", "config_file", "gpu"):
        assert key in run_notes[0], (key, run_notes[0])
    assert cfg.model_id == -1
    if schema is EvalConfig:
        assert cfg.ckpt_iter == -1 and cfg.problem == "eval"
        assert cfg.n_augs_train == -1 and cfg.n_augs_test == -1  # the spec's problem eval never reads them
    else:
        assert "ckpt_iter" in run_notes[0]
        assert cfg.momentum == 0.9 and cfg.lr_scaling == "none" and not cfg.zero_init_residual


def test_spec_aliases_bools_and_problems():
    cfg, _ = config_lib.parse(PretrainConfig, ["--wd", "1e-5", "-j", "3", "--sync_bn", "False", "--aug", "True",
                                               "--test_bs", "100", "--precompute_emb_bs", "128"])
    assert (cfg.weight_decay, cfg.workers, cfg.sync_bn, cfg.aug, cfg.test_bs) == (1e-5, 3, False, True, 100)
    cfg, _ = config_lib.parse(EvalConfig, ["--problem", "semi-supervised-eval", "--train_size", "500",
                                           "--data_split_seed", "1", "--n_augs_train", "10", "--n_augs_test",
                                           "50", "--acc_on_unlabeled", "true", "--finetune", "false"])
    assert (cfg.problem, cfg.train_size, cfg.n_augs_train, cfg.n_augs_test, cfg.acc_on_unlabeled) == \
        ("semi-supervised-eval", 500, 10, 50, True)
    for argv, needle in ((["--momentum", "0.5"], "momentum"), (["--model_id", "7"], "model_id"),
                         (["--blur_sigma", "2,1"], "blur_sigma"), (["--lr_scaling", "cube"], "lr_scaling")):
        with pytest.raises(ConfigError, match=needle):
            config_lib.parse(PretrainConfig, argv)


def test_official_knobs():
    assert scaled_lr(4.0, 1024, "none") == 4.0
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
    for arch, last in (("resnet18", "bn2"), ("resnet50", "bn3")):
        off = SimCLRModel(arch, width=8)
        on = SimCLRModel(arch, width=8, zero_init_residual=True)
        blocks = [b for layer in (on.convnet.layer1, on.convnet.layer4) for b in layer]
        assert all(float(getattr(b, last).weight.detach().abs().sum()) == 0 for b in blocks)
        assert float(getattr(off.convnet.layer1[0], last).weight.detach().min()) == 1.0
    aug = BatchAugment(AugSpec(96, blur="on", blur_sigma=(0.2, 2.0)))
    p = aug.params(torch.full((2000,), 96.0), torch.full((2000,), 96.0), torch.Generator().manual_seed(0))
    assert 0.2 <= float(p.sigma.min()) < 0.25 and 1.95 < float(p.sigma.max()) <= 2.0
    assert math.isclose(BatchAugment(AugSpec(96)).spec.blur_sigma[0], 0.1)


# --------------------------------------------------------------------------------------------
# running: each file for one step on the CPU, through train.py
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in sorted(SPEC_FILES) if "train" in n])
def test_spec_pretrain_file_runs_one_step(tmp_path, data_root, name):
    """One step through train.py; the file's values (not the defaults) are what the model, the optimizer
    and the run were built with, read back from the checkpoint it wrote."""
    path = _write(tmp_path, name)
    spec = yaml.safe_load(SPEC_FILES[name])
    r = _train_py("--config", path, *PRETRAIN_SHRINK, *_imagenet_size(name), "--root", tmp_path / "logs")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "describe a past run" in r.stderr
    (ck_path,) = (tmp_path / "logs").glob("*/*/checkpoints/checkpoint-*.pt")
    ck = torch.load(ck_path, map_location="cpu", weights_only=False)
    model, groups = ck["model"], ck["optimizer"]["param_groups"]
    assert spec["arch"] == "ResNet50"  # bottleneck blocks, 3-4-6-3, width 8 (shrunk) x expansion 4
    assert "convnet.layer1.0.conv3.weight" in model and "convnet.layer3.5.conv1.weight" in model
    assert "convnet.layer3.6.conv1.weight" not in model
    assert ck["image_size"] == (32 if spec["data"] == "cifar" else 64)  # CIFAR's own side; ImageNet shrunk
    assert tuple(model["convnet.conv1.weight"].shape) == (8, 3, 3, 3)  # <= 96 px: the CIFAR stem (3x3 conv)
    assert spec["opt"] == "lars" and all("trust_coefficient" in g for g in groups)
    decay = [g for g in groups if not g["exclude"]]
    assert [g["weight_decay"] for g in decay] == [spec["weight_decay"]] and all(g["momentum"] == 0.9 for g in groups)
    for key in ("lr", "temperature", "color_dist_s", "warmup", "scale_lower", "lr_schedule"):
        assert ck["config"][key] == spec[key], key
    assert (ck["config"]["data"], ck["config"]["batch_size"], ck["config"]["iters"]) == \
        ({"cifar": "cifar10"}.get(spec["data"], spec["data"]), 16, 1)  # the overrides: shrinking only


def _eval_json(root: Path) -> dict:
    (path,) = sorted(root.glob("*/*/eval.json"))
    return json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar_eval.yaml", "imagenet_eval.yaml"])
def test_spec_eval_file_runs_one_step_on_the_fly(tmp_path, encoders, name):
    path = _write(tmp_path, name)
    enc = encoders["imagenet" if "imagenet" in name else "cifar"]
    r = _train_py("--config", path, "--encoder_ckpt", enc, *SHRINK, "--root", tmp_path / "logs")
    assert r.returncode == 0, r.stderr[-3000:]
    res = _eval_json(tmp_path / "logs")
    assert res["details"]["protocol_variant"] == "on-the-fly"
    assert res["data"]["n_augs_train"] == -1 and res["data"]["n_augs_test"] == -1
    if name == "cifar_eval.yaml":
        assert "ignoring n_augs_train: 10, n_augs_test: 50" in r.stderr


@pytest.mark.slow
def test_semi_supervised_eval_both_entry_points(tmp_path, encoders):
    path = _write(tmp_path, "cifar_eval.yaml")
    semi = ["--problem", "semi-supervised-eval", "--train_size", "20", "--data_split_seed", "42",
            "--n_augs_train", "2", "--n_augs_test", "2", "--acc_on_unlabeled", "true"]
    r = _train_py("--config", path, "--encoder_ckpt", encoders["cifar"], *SHRINK, *semi,
                  "--root", tmp_path / "a")
    assert r.returncode == 0, r.stderr[-3000:]
    res = _eval_json(tmp_path / "a")
    assert res["details"]["protocol_variant"] == "precomputed-augmented-copies+test-time-averaging"
    assert res["n_train"] == 20 and res["details"]["n_unlabeled"] == 44
    assert "unlabeled_top1" in res["details"] and res["details"]["problem"] == "semi-supervised-eval"

    r = run_cli("eval", "--encoder_ckpt", encoders["cifar"], *SHRINK, "--problem", "semi-supervised-eval",
                "--train_size", "20", "--root", tmp_path / "b", "--verbose", "false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _eval_json(tmp_path / "b")["n_train"] == 20

    # `simclr eval` on the same encoder, defaults: the spec's problem eval protocol
    r = run_cli("eval", "--encoder_ckpt", encoders["cifar"], *SHRINK, "--root", tmp_path / "c",
                "--verbose", "false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _eval_json(tmp_path / "c")["details"]["protocol_variant"] == "on-the-fly"
    assert "(on-the-fly)" in r.stdout
