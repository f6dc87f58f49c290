"""DATA_ROOT: one default that the CLI resolves itself, and a failed lookup leaves no folder behind."""
from __future__ import annotations

import pytest
from tests.conftest import REPO, run_cli

from simclr.data import get_dataset
from simclr.data.datasets import data_root as resolve_root
from simclr.errors import DataError

SHARED = REPO.parent / "shared" / "data"  # the folder the Makefile and the test suite use


def test_unset_it_is_the_shared_folder_next_to_the_clone(tmp_path, monkeypatch, data_root):
    monkeypatch.delenv("DATA_ROOT")
    monkeypatch.chdir(tmp_path)  # no ./data here
    assert resolve_root().resolve() == SHARED.resolve()


def test_a_local_data_folder_wins_only_when_it_holds_something(tmp_path, monkeypatch, data_root):
    monkeypatch.delenv("DATA_ROOT")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # empty, e.g. left by an older version's failed lookup
    assert resolve_root().resolve() == SHARED.resolve()
    (tmp_path / "data" / "cifar10").mkdir()
    assert resolve_root().resolve() == (tmp_path / "data").resolve()


def test_the_env_var_always_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "x"))
    assert resolve_root() == tmp_path / "x"


@pytest.mark.parametrize("name", ["cifar10", "stl10"])
def test_a_failed_lookup_creates_no_folder(tmp_path, monkeypatch, name):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "missing" / "data"))
    with pytest.raises(DataError, match="not found") as e:
        get_dataset(name, "test")
    assert "DATA_ROOT" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # neither missing/ nor missing/data/ nor anything inside


def test_a_command_from_another_folder_finds_the_data_without_data_root(tmp_path, data_root):
    r = run_cli("knn", "--data", "cifar10", "--encoder_arch", "resnet18", "--encoder_width", "8",
                "--train_subset", "100", "--test_subset", "50", "--device", "cpu", "--root", tmp_path / "logs",
                env={"DATA_ROOT": ""}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "top-1" in r.stdout
    assert not (tmp_path / "data").exists()
