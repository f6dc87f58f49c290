"""No option that silently does nothing: --dist dp really launches one process per GPU, options kept for the
spec's configs that take one value refuse any other, one optimizer factory, and every run records whether its
code was committed."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from simclr import cli, launch, rundir
from simclr import config as config_lib
from simclr.errors import ConfigError, UserError
from simclr.files import git_state
from simclr.optim import MOMENTUM, build_optimizer
from simclr.eval_options import EvalConfig, KnnConfig
from simclr.options import COMPATIBILITY_ONLY, PretrainConfig

from tests.conftest import tiny_args

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
             launch.PROCS_ENV)


# --------------------------------------------------------------------------------------------
# --dist dp
# --------------------------------------------------------------------------------------------
@pytest.fixture
def node(monkeypatch):
    """A node without torchrun variables whose GPU count a test sets; spawning is recorded, not done."""
    monkeypatch.setattr(os, "environ", dict(os.environ))  # maybe_spawn may write ranks: put them back after
    for k in RANK_VARS:
        os.environ.pop(k, None)
    spawned = []

    def gpus(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    def start_processes(fn, args=(), nprocs=1, join=True, start_method="spawn"):
        spawned.append({"nprocs": nprocs, "env": args[1], "argv": args[4], "start_method": start_method})

    monkeypatch.setattr(torch.multiprocessing, "start_processes", start_processes)
    return gpus, spawned


def test_dist_dp_launches_one_process_per_visible_gpu(node):
    gpus, spawned = node
    gpus(2)
    cfg = PretrainConfig(dist="dp", batch_size=64)
    assert launch.dp_note(cfg) == ""
    assert launch.maybe_spawn(cfg, ["--dist", "dp"], print) is True
    assert len(spawned) == 1 and spawned[0]["nprocs"] == 2
    env = spawned[0]["env"]
    assert (env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["NODE_RANK"]) == ("2", "2", "0")
    assert "RANK" not in os.environ  # only the children get ranks
    gpus(4)  # a 4-GPU node: four processes, each a quarter of the batch
    assert launch.maybe_spawn(PretrainConfig(dist="dp", batch_size=64), [], print) is True
    assert spawned[-1]["nprocs"] == 4
    with pytest.raises(UserError, match="not divisible by the number of processes 4"):
        launch.maybe_spawn(PretrainConfig(dist="dp", batch_size=66), [], print)


def test_dist_dp_through_the_command_line_spawns_per_gpu_and_notes_a_single_process(node, tmp_path, monkeypatch,
                                                                                        capsys):
    gpus, spawned = node
    trained = []
    monkeypatch.setattr("simclr.train.pretrain", lambda cfg, should_stop=None, started=None: trained.append(cfg) or {})
    argv = ["pretrain", *tiny_args(tmp_path), "--device", "auto", "--dist", "dp"]
    gpus(2)
    assert cli.main(argv) == 0
    assert [s["nprocs"] for s in spawned] == [2] and spawned[0]["argv"] == argv[1:]  # each child: the same command
    assert trained == [] and "note:" not in capsys.readouterr().err  # this process only waited for them
    gpus(0)  # a CPU machine: one process, trained here, and one line that says why
    assert cli.main(argv) == 0
    assert len(spawned) == 1 and len(trained) == 1
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "--dist dp" in notes[0] and "no GPU is visible" in notes[0], notes
    assert "one process" in notes[0]


def test_dist_dp_is_one_node_and_evaluation_says_it_is_one_process(node):
    gpus, spawned = node
    gpus(2)
    with pytest.raises(UserError, match="--dist dp runs on this node only.*--dist ddp"):
        launch.maybe_spawn(PretrainConfig(dist="dp", world_size=2), [], print)
    with pytest.raises(UserError, match="--device cuda:1 pins one GPU, but --dist dp"):
        launch.maybe_spawn(PretrainConfig(dist="dp", device="cuda:1"), [], print)
    assert "--device cpu" in launch.dp_note(PretrainConfig(dist="dp", device="cpu"))
    assert launch.maybe_spawn(PretrainConfig(dist="dp", device="cpu"), [], print) is False
    assert spawned == []
    _, notes = config_lib.parse(EvalConfig, ["--dist", "dp"])
    assert any("evaluation runs in one process" in n and "--dist dp" in n for n in notes), notes
    _, notes = config_lib.parse(EvalConfig, [])
    assert not any("one process" in n for n in notes)


# --------------------------------------------------------------------------------------------
# options accepted for compatibility only
# --------------------------------------------------------------------------------------------
REFUSED = [  # schema, argv, why (in the user's words)
    (PretrainConfig, ["--momentum", "0.8"], "fixed at 0.9"),
    (EvalConfig, ["--momentum", "0.5"], "fixed at 0.9"),
    (PretrainConfig, ["--model_id", "3"], "--ckpt"),
    (EvalConfig, ["--model_id", "7"], "--encoder_ckpt"),
    (EvalConfig, ["--arch", "mlp"], "--encoder_arch"),
]


@pytest.mark.parametrize("schema,argv,why", REFUSED, ids=[" ".join(a) for _, a, _ in REFUSED])
def test_compatibility_only_options_refuse_other_values_and_say_why(schema, argv, why):
    with pytest.raises(ConfigError) as e:
        config_lib.parse(schema, argv)
    msg = str(e.value)
    assert msg.startswith(f"option '{argv[0][2:]}' got "), msg
    assert "compatibility only" in msg and why in msg, msg


def test_compatibility_only_options_accept_their_value_and_document_it():
    cfg, _ = config_lib.parse(PretrainConfig, ["--momentum", "0.9", "--model_id", "-1"])
    assert (cfg.momentum, cfg.model_id) == (0.9, -1)
    cfg, _ = config_lib.parse(EvalConfig, ["--momentum", "0.9", "--model_id", "-1", "--arch", "Linear"])
    assert (cfg.momentum, cfg.model_id, cfg.arch) == (0.9, -1, "linear")
    for schema, keys in ((PretrainConfig, ("momentum", "model_id")), (EvalConfig, ("momentum", "model_id", "arch"))):
        lines = config_lib.help_text(schema).splitlines()
        for key in keys:  # the help line after the option's says what it is
            i = next(i for i, ln in enumerate(lines) if ln.strip().startswith(f"--{key} "))
            assert "accepted for compatibility" in lines[i + 1], (key, lines[i + 1])
    assert "accepted for compatibility" not in config_lib.help_text(KnnConfig)
    # the value the table promises is the one the optimizers use
    assert COMPATIBILITY_ONLY["momentum"][1] == MOMENTUM == 0.9


# --------------------------------------------------------------------------------------------
# one optimizer factory
# --------------------------------------------------------------------------------------------
def test_build_optimizer_from_a_module_or_from_parameter_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = build_optimizer(model, "sgd", 0.5, 1e-3)
    assert [(g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [(1e-3, 1), (0.0, 3)]
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    head, enc = nn.Linear(3, 2), nn.Linear(4, 3)
    groups = [{"params": list(head.parameters()), "lr": 0.1}, {"params": list(enc.parameters()), "lr": 0.01,
                                                                 "weight_decay": 0.0}]
    sgd = build_optimizer(groups, "sgd", 0.1, 1e-4)
    assert [(g["lr"], g["weight_decay"], g["momentum"]) for g in sgd.param_groups] == [(0.1, 1e-4, 0.9),
                                                                                         (0.01, 0.0, 0.9)]
    adam = build_optimizer(groups, "adam", 0.1, 1e-4)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["weight_decay"] == 1e-4
    # one SGD step with weight decay and momentum, by hand: v = g + wd * w; w <- w - lr * v
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    w.grad = torch.tensor([0.5, 0.5])
    build_optimizer([{"params": [w]}], "sgd", 0.1, 0.01).step()
    assert torch.allclose(w.detach(), torch.tensor([1.0 - 0.1 * (0.5 + 0.01), -2.0 - 0.1 * (0.5 - 0.02)]))


# --------------------------------------------------------------------------------------------
# the git state of the code a run used
# --------------------------------------------------------------------------------------------
def _git(repo: Path, *args) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def test_git_state_tells_a_clean_checkout_from_a_dirty_one(tmp_path):
    assert git_state(tmp_path) == ("", None) and git_state(tmp_path).label == "unknown"  # not a checkout
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    sha = _git(repo, "rev-parse", "HEAD")
    assert git_state(repo) == (sha, False) and git_state(repo).label == sha[:7]
    (repo / "new.py").write_text("")  # untracked files do not make it dirty
    assert git_state(repo).dirty is False
    (repo / "a.py").write_text("x = 2\n")
    assert git_state(repo) == (sha, True) and git_state(repo).label == sha[:7] + "+dirty"
    _git(repo, "add", "a.py")  # staged, not committed: still dirty
    assert git_state(repo).dirty is True


def test_every_runs_environment_records_whether_its_code_was_committed():
    env = rundir.environment("cpu")
    src = Path(rundir.__file__).resolve().parent
    try:
        head = _git(src, "rev-parse", "HEAD")
    except subprocess.CalledProcessError:  # an installed copy: no commit, and so no dirty flag
        assert (env["git_commit"], env["git_dirty"]) == ("", None)
        return
    assert env["git_commit"] == head
    assert env["git_dirty"] is bool(_git(src, "status", "--porcelain", "--untracked-files=no"))
