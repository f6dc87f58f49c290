"""Option roles (simclr.options, simclr.eval_options, simclr.config.with_role): each option declares where it is
defined what it is to a run, and every reader of a role reads that declaration."""
from __future__ import annotations

import dataclasses
import re

import pytest

from tests.conftest import run_cli
from simclr.config import ROLES, fields, option, parse, with_role
from simclr.errors import ConfigError
from simclr.eval_options import EvalConfig, KnnConfig
from simclr.options import PretrainConfig


def undeclared_trajectory(cls) -> list:
    """The options of ``cls`` that say neither ``trajectory=True`` nor ``trajectory=False``."""
    return [f.name for f in fields(cls) if f.metadata.get("trajectory") not in (True, False)]


def test_every_pretraining_option_declares_whether_it_changes_the_trajectory():
    # a new option that forgets it would let a resume change the run without a word
    assert undeclared_trajectory(PretrainConfig) == []


def test_every_eval_option_declares_whether_it_changes_the_head():
    # a resumed linear evaluation refuses changes of role trajectory (simclr.evaluate.resume.check_fits)
    assert undeclared_trajectory(EvalConfig) == []
    head = set(with_role(EvalConfig, "trajectory"))
    assert {"iters", "lr", "batch_size", "augmentation", "finetune", "seed", "protocol"} <= head
    assert not head & {"test_subset", "test_bs", "workers", "save_freq", "keep_last", "stop_after", "resume",
                       "encoder_ckpt"}  # the encoder is compared by its content


def test_an_option_without_a_trajectory_role_is_caught():
    @dataclasses.dataclass
    class WithANewOption(PretrainConfig):
        new: float = option(0.1, "an option its author forgot to classify")
        other: float = option(0.1, "a classified one", trajectory=False)

    assert undeclared_trajectory(WithANewOption) == ["new"]
    assert "new" not in with_role(WithANewOption, "trajectory")


def test_roles_are_the_declared_ones_and_unknown_roles_are_refused():
    assert set(ROLES) == {"trajectory", "shapes", "per_process", "optimizer", "knn", "bookkeeping"}
    shapes = with_role(PretrainConfig, "shapes")
    assert set(shapes) == {"arch", "width", "timm_kwargs", "proj_layers", "proj_dim"}
    assert "loss" in with_role(PretrainConfig, "trajectory")  # --loss dcl is another run
    assert "opt" in with_role(PretrainConfig, "optimizer") and "opt" in with_role(PretrainConfig, "trajectory")
    assert not set(with_role(PretrainConfig, "per_process")) & set(with_role(PretrainConfig, "trajectory"))
    with pytest.raises(KeyError, match="unknown option role"):
        with_role(PretrainConfig, "trajectroy")


def test_simclr_knn_takes_exactly_the_eval_options_of_role_knn():
    knn = [f.name for f in fields(KnnConfig)]
    assert knn == list(with_role(EvalConfig, "knn")) and "k" in knn and "lr" not in knn


def test_loss_names_are_checked_before_any_work():
    assert parse(PretrainConfig, ["--loss", "dcl", "--batch_size", "2"])[0].loss == "dcl"
    with pytest.raises(ConfigError, match="allowed: nt-xent, dcl, or a name registered"):
        parse(PretrainConfig, ["--loss", "infonce"])
    with pytest.raises(ConfigError, match="--loss dcl needs --batch_size 2 or more"):
        parse(PretrainConfig, ["--loss", "dcl", "--batch_size", "1"])


def test_eval_help_has_no_pretraining_width():
    r = run_cli("eval", "--help")
    assert r.returncode == 0
    assert "--encoder_width" in r.stdout
    assert not re.search(r"^\s*--width(_multiplier)?\b", r.stdout, re.M)


def test_the_options_compare_lists_apart_are_those_that_say_where_or_how_a_run_ran():
    """The bookkeeping role replaces the report's hand-kept set; the set it replaced is the reference."""
    from simclr.report.plots import BOOKKEEPING, config_diff
    before = {"resume", "device", "name", "root", "run_dir", "ckpt", "verbose", "log_freq", "save_freq", "eval_freq",
              "keep_last", "workers", "logger", "mlflow_uri", "model_id", "dist", "dist_address", "node_rank",
              "stop_after", "allow_config_change", "eval_at_start"}
    assert BOOKKEEPING == before
    for cls in (PretrainConfig, EvalConfig):  # none of them changes what a run learns
        assert not set(with_role(cls, "bookkeeping")) & set(with_role(cls, "trajectory"))
    runs = [{"lr": 0.1, "device": "cpu", "seed": 0}, {"lr": 0.2, "device": "cuda", "seed": 0}]
    assert config_diff(runs) == {"lr": [0.1, 0.2]}
    assert config_diff(runs, bookkeeping=True) == {"device": ["cpu", "cuda"]}
