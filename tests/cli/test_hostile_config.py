"""Hostile option values and config files through the CLI (in this process): each ends in one `error:` line and
exit code 2 with nothing written."""
from __future__ import annotations

import tracemalloc

import pytest

from tests.conftest import run_cli, tiny_args
from tests.helpers.folder_runs import one_error_line


@pytest.mark.parametrize("value, says", [("1000000000000", "must be within [1, 10,000,000]"),
                                         ("1e20", "expects an integer within ±2**63")])  # past int64 already
def test_memory_sized_options_have_ranges(tmp_path, value, says):
    msg = one_error_line(run_cli("pretrain", *tiny_args(tmp_path), "--iters", value))
    assert "option 'iters'" in msg and says in msg
    assert not (tmp_path / "logs").exists()


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    # 9 levels of 9 aliases: 9**9 (387 million) strings if anything expanded or printed it
    levels = ['&a ["x","x","x","x","x","x","x","x","x"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        levels.append(f"&{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    (tmp_path / "bomb.yaml").write_text(f"name: [{', '.join(levels)}]\n")
    tracemalloc.start()
    try:
        msg = one_error_line(run_cli("pretrain", "--config", tmp_path / "bomb.yaml"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "option 'name' expects a string" in msg and len(msg) < 200
    assert peak < 50 << 20, peak  # nothing expanded: 387 million strings would take gigabytes


def test_yaml_with_many_aliases_is_refused(tmp_path):
    (tmp_path / "many.yaml").write_text("x: &a 1\nl: [" + ", ".join(["*a"] * 150) + "]\n")
    msg = one_error_line(run_cli("pretrain", "--config", tmp_path / "many.yaml"))
    assert "more than 100 YAML aliases" in msg


def test_duplicate_yaml_keys_are_refused(tmp_path):
    (tmp_path / "dup.yaml").write_text("lr: 0.1\nbatch_size: 32\nlr: 0.5\n")
    msg = one_error_line(run_cli("pretrain", "--config", tmp_path / "dup.yaml"))
    assert "key 'lr' is written twice (line 3)" in msg


def test_errors_say_where_a_bad_key_came_from(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.1\n")
    msg = one_error_line(run_cli("pretrain", "--config", tmp_path / "c.yaml", "--lrr", "1"))
    assert "unknown option 'lrr' (on the command line)" in msg
    (tmp_path / "c.yaml").write_text("lrr: 0.1\n")
    msg = one_error_line(run_cli("pretrain", "--config", tmp_path / "c.yaml"))
    assert f"unknown option 'lrr' (in {tmp_path / 'c.yaml'})" in msg
