"""The spec's launch form: clear errors before any process-group work, and the handed function
running in every spawned process with its ranks (the launcher knows nothing of the CLI)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simclr import launch
from simclr.options import PretrainConfig
from simclr.errors import UserError

from tests.conftest import tiny_args

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
             launch.PROCS_ENV)


def _cfg(**kw) -> PretrainConfig:
    return PretrainConfig(device="cpu", batch_size=32, **kw)


def _clean_env(monkeypatch) -> None:
    # maybe_spawn writes the ranks into os.environ: give it a copy that is put back afterwards
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for k in RANK_VARS:
        os.environ.pop(k, None)


def test_indivisible_batch_is_refused_before_spawning(monkeypatch):
    _clean_env(monkeypatch)
    with pytest.raises(UserError, match=r"batch_size 33 is not divisible by the number of processes 2"):
        launch.maybe_spawn(PretrainConfig(device="cpu", batch_size=33, dist="ddp", world_size=2), [], print)
    os.environ[launch.PROCS_ENV] = "3"  # 2 nodes x 3 processes
    with pytest.raises(UserError, match=r"batch_size 32 is not divisible by the number of processes 6"):
        launch.maybe_spawn(_cfg(dist="ddp", world_size=2), [], print)
    # under torchrun the environment gives the world size
    del os.environ[launch.PROCS_ENV]
    os.environ.update(RANK="1", WORLD_SIZE="3")
    with pytest.raises(UserError, match=r"batch_size 32 is not divisible by the number of processes 3"):
        launch.maybe_spawn(_cfg(), [], print)


def test_launch_form_errors_and_single_node_env(monkeypatch):
    _clean_env(monkeypatch)
    with pytest.raises(UserError, match="--node_rank 2 must be below --world_size 2"):
        launch.maybe_spawn(_cfg(dist="ddp", world_size=2, node_rank=2), [], print)
    with pytest.raises(UserError, match="<address>:<port>"):
        launch.maybe_spawn(_cfg(dist="ddp", world_size=2, dist_address="10.0.0.1"), [], print)
    assert launch.maybe_spawn(_cfg(dist="ddp", world_size=1), [], print) is False  # one process in all
    assert "RANK" not in os.environ
    # a CPU node of a 2-node job is one process: this one, with its ranks set for init()
    assert launch.maybe_spawn(_cfg(dist="ddp", world_size=2, node_rank=1, dist_address="10.1.2.3:4567"),
                              [], print) is False
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) \
        == ("1", "2", "10.1.2.3", "4567")


def _record(argv: list) -> None:
    """A spawned process's body: write what it was given; exit with argv[1] if there is one."""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    Path(argv[0], f"rank{os.environ['RANK']}.json").write_text(
        json.dumps({"argv": argv, **{k: os.environ[k] for k in keys}}))
    if len(argv) > 1:
        sys.exit(int(argv[1]))


def test_spawned_processes_run_the_handed_function_with_their_ranks(monkeypatch, tmp_path):
    _clean_env(monkeypatch)
    os.environ[launch.PROCS_ENV] = "2"  # node 1 of 2, two processes here: global ranks 2 and 3
    cfg = _cfg(dist="ddp", world_size=2, node_rank=1, dist_address="10.1.2.3:4567")
    assert launch.maybe_spawn(cfg, [str(tmp_path)], _record) is True
    got = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    assert sorted(got) == ["rank2.json", "rank3.json"]
    for r, local in ((2, 0), (3, 1)):
        env = got[f"rank{r}.json"]
        assert env["argv"] == [str(tmp_path)]
        assert (env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["NODE_RANK"]) == \
            (str(local), "4", "2", "1")
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.1.2.3", "4567")
    assert "RANK" not in os.environ  # only the children got ranks
    # a process that fails makes the launcher fail with its rank and exit code
    (tmp_path / "fail").mkdir()
    with pytest.raises(UserError, match=r"process \d of this node \(rank [23]\) exited with code 3"):
        launch.maybe_spawn(cfg, [str(tmp_path / "fail"), "3"], _record)


def test_cli_indivisible_batch_exits_before_waiting_for_peers(tmp_path):
    # without the check, rank 0 would wait for a second node that never comes
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    r = subprocess.run([sys.executable, "-m", "simclr", "pretrain", *tiny_args(tmp_path, batch_size=33), "--dist",
                        "ddp", "--world_size", "2", "--dist_address", "127.0.0.1:1"], capture_output=True,
                       text=True, timeout=600, env=env, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2, r.stderr
    assert "batch_size 33 is not divisible by the number of processes 2" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "logs").exists()
