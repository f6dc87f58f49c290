"""simclr.lifecycle: one life for every run folder (pretraining and evaluation alike): begun, ended, and whatever
stops it recorded the same way, an out-of-memory error turned into the command's advice, the folder always closed."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from tests.conftest import run_cli, tiny_args
from simclr.errors import UserError
from simclr.lifecycle import Lifecycle
from simclr.options import PretrainConfig
from simclr.rundir import RunDir


def _cfg(tmp_path) -> PretrainConfig:
    return PretrainConfig(root=str(tmp_path), name="life", logger="none")


def _status(run: RunDir) -> dict:
    return json.loads((run.path / "status.json").read_text())


def _lock_released(run: RunDir) -> bool:
    try:
        RunDir(run.path, tensorboard=False).close()  # a second writer gets the folder only once the first let go
        return True
    except UserError:
        return False


def test_begin_writes_the_folder_and_end_records_the_status(tmp_path):
    cfg = _cfg(tmp_path)
    with Lifecycle(verbose=False) as life:
        logging.getLogger("simclr.test").info("note: said before the folder existed")
        run = RunDir.create(cfg.root, cfg.name, "")
        life.begin(run, cfg, {"host": "here"}, step=0, iters=3)
        assert _status(run)["status"] == "running" and not _lock_released(run)
        life.end("finished", step=3)
    assert _status(run)["status"] == "finished" and _status(run)["step"] == 3
    assert (run.path / "config.yaml").is_file() and json.loads((run.path / "env.json").read_text()) == {"host": "here"}
    assert (run.path / "log.txt").read_text().startswith("note: said before the folder existed\n")
    assert _lock_released(run)


@pytest.mark.parametrize("error, status", [(ValueError("a bug"), "failed"), (KeyboardInterrupt(), "interrupted"),
                                           (SystemExit(1), "interrupted")])
def test_whatever_stops_the_work_is_recorded_and_the_folder_closed(tmp_path, error, status):
    cfg = _cfg(tmp_path)
    with pytest.raises(type(error)):
        with Lifecycle(verbose=False, at_failure=lambda: {"step": 7}) as life:
            run = RunDir.create(cfg.root, cfg.name, "")
            life.begin(run, cfg, {})
            raise error
    assert _status(run)["status"] == status and _status(run)["step"] == 7
    assert _status(run)["error"].startswith(type(error).__name__)
    assert _lock_released(run)


def test_out_of_memory_becomes_the_commands_advice_in_the_error_and_the_status(tmp_path):
    cfg = _cfg(tmp_path)
    advice = UserError("out of memory on cpu: this does not fit; lower --batch_size")
    with pytest.raises(UserError) as caught:
        with Lifecycle(verbose=False, out_of_memory=lambda: advice) as life:
            run = RunDir.create(cfg.root, cfg.name, "")
            life.begin(run, cfg, {})
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert caught.value is advice and caught.value.__cause__ is None
    assert _status(run)["status"] == "failed" and "lower --batch_size" in _status(run)["error"]
    assert _lock_released(run)


def test_an_error_before_the_folder_exists_leaves_nothing(tmp_path):
    with pytest.raises(UserError, match="bad input"):
        with Lifecycle(verbose=False):
            raise UserError("bad input")
    assert list(tmp_path.iterdir()) == []


def test_pretraining_and_evaluation_say_out_of_memory_alike(tmp_path, data_root, monkeypatch):
    """Both commands go through the one lifecycle: the same first words, the run folder failed with the advice."""
    import simclr.evaluate.features as features
    import simclr.train.loop as loop

    def oom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GiB")
    monkeypatch.setattr(loop, "train_step", oom)
    r = run_cli("pretrain", *tiny_args(tmp_path, iters=2))
    (run,) = [p.parent for p in (tmp_path / "logs").glob("t/*/status.json")]
    pre = json.loads((run / "status.json").read_text())
    monkeypatch.setattr(features, "extract_features", oom)
    r2 = run_cli("knn", "--encoder_arch", "resnet18", "--encoder_width", "8", "--train_subset", "100",
                 "--test_subset", "50", "--device", "cpu", "--root", tmp_path / "ev", "--verbose", "false")
    (ev,) = [p.parent for p in (tmp_path / "ev").glob("*/*/status.json")]
    post = json.loads((ev / "status.json").read_text())
    for rc, err, status in ((r.returncode, r.stderr, pre), (r2.returncode, r2.stderr, post)):
        assert rc != 0 and "error: out of memory on cpu: " in err and "does not fit; " in err
        assert status["status"] == "failed" and "out of memory on cpu" in status["error"]
    assert "--batch_size 32 x 2 views" in r.stderr and "--test_bs" in r2.stderr
