"""``simclr --version``, every ``--help`` and every option error answer without importing torch.

The process is the point here: each check runs in a fresh interpreter (nothing imported before it), so
the tests start a few children; one child runs many ``main()`` calls in a row, which is valid because
none of them may import torch, and it records after each call which heavy module had appeared.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from simclr import models, names
from simclr.data import datasets
from simclr.errors import DataError

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "pandas", "matplotlib")
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)

# A child interpreter: run each argv through simclr.cli.main (or spec_main, the spec's train.py), record the exit
# code, stdout, stderr and the heavy modules loaded so far, print it all as JSON.
CHILD = textwrap.dedent("""
    import contextlib, io, json, sys
    from simclr import cli
    out = []
    for entry, argv in json.loads(sys.argv[1]):
        so, se = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            try:
                rc = getattr(cli, entry)(argv)
            except SystemExit as e:
                rc = e.code
        out.append({"argv": argv, "rc": rc, "out": so.getvalue(), "err": se.getvalue(),
                    "heavy": [m for m in HEAVY if m in sys.modules]})
    print(json.dumps(out))
""").replace("HEAVY", repr(HEAVY))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def _run_child(calls: list, tmp_path: Path) -> list:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(calls)], capture_output=True, text=True,
                       timeout=300, env=_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _assert_light(results: list) -> None:
    for res in results:  # the first call after which a heavy module is loaded is the one that imported it
        assert res["heavy"] == [], f"{res['argv']} imported {res['heavy']}"


COMMANDS = ("pretrain", "eval", "knn", "runs", "report", "compare", "export", "embed", "bench")


def test_version_and_every_help_answer_without_torch(tmp_path):
    calls = [("main", ["--version"]), ("main", ["--help"]), ("main", [])]
    calls += [("main", [c, "--help"]) for c in COMMANDS]
    calls += [("spec_main", ["--help"])]  # python train.py --help: pretraining's options
    res = _run_child(calls, tmp_path)
    _assert_light(res)
    assert [r["rc"] for r in res] == [0] * len(calls)
    assert res[0]["out"] == f"simclr {VERSION}\n"
    for r in res[1:3]:
        assert r["out"].startswith("usage: simclr <command>")
        assert all(re.search(rf"^  {c} ", r["out"], re.M) for c in COMMANDS), r["out"]
    for c, r in zip(COMMANDS, res[3:]):
        assert r["out"].startswith(f"usage: simclr {c} "), (c, r["out"][:80])
        assert "--" in r["out"] and r["err"] == ""
    assert res[-1]["out"].startswith("usage: simclr pretrain ")


def test_every_kind_of_option_error_answers_without_torch(tmp_path):
    missing = str(tmp_path / "no_such.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("lr: [1, 2\n")
    cases = [  # (entry, argv, a phrase of the one error line)
        ("main", ["pretrain", "--temprature", "0.1"], "unknown option 'temprature'"),
        ("main", ["pretrain", "--lr", "abc"], "option 'lr' expects a number, got 'abc'"),
        ("main", ["pretrain", "--config", missing], "config file not found"),
        ("main", ["pretrain", "--config", str(bad_yaml)], str(bad_yaml)),
        ("main", ["pretrain", "--arch", "resnet51"], "option 'arch' got 'resnet51'"),
        ("main", ["pretrain", "--data", "mnist"], "option 'data' got 'mnist'"),
        ("main", ["pretrain", "--width", "100", "--width_multiplier", "2"], "disagree"),
        ("main", ["pretrain", "--timm_kwargs", "{"], "not valid JSON"),
        ("main", ["pretrain", "--momentum", "0.5"], "option 'momentum' got 0.5"),
        ("main", ["pretrain", "--model_id", "3"], "option 'model_id' got 3"),
        ("main", ["eval", "--encoder_ckpt", "a", "--bogus", "1"], "unknown option 'bogus'"),
        ("main", ["eval", "--encoder_arch", "resnet7"], "option 'encoder_arch' got 'resnet7'"),
        ("main", ["eval", "--config", missing], "config file not found"),
        ("main", ["eval", "--arch", "mlp"], "option 'arch' got 'mlp'"),
        ("main", ["knn", "--lr", "0.1"], "belongs to `simclr eval`"),
        ("main", ["knn", "--k", "0"], "option 'k' got 0"),
        ("main", ["runs", "--format", "xml"], "option 'format' got 'xml'"),
        ("main", ["report", "--bogus", "1"], "missing RUN"),
        ("main", ["compare", "a"], "at least two"),
        ("main", ["export", "x.pt"], "option 'out' is required"),
        ("main", ["embed", "--out", "f.npy"], "option 'encoder_ckpt' is required"),
        ("main", ["bench", "--paths", "slow"], "unknown path 'slow'"),
        ("main", ["bench", "--steps", "0"], "option 'steps' got 0"),
        ("main", ["nosuch"], "unknown command 'nosuch'"),
        ("spec_main", ["--config", missing], "config file not found"),
    ]
    res = _run_child([(e, a) for e, a, _ in cases], tmp_path)
    _assert_light(res)
    for (_, argv, phrase), r in zip(cases, res):
        assert r["rc"] == 2, (argv, r)
        first = r["err"].splitlines()[0]
        assert first.startswith("error: ") and phrase in first, (argv, r["err"])
        assert "Traceback" not in r["err"] and r["out"] == ""


def test_import_simclr_and_python_m_simclr_are_light(tmp_path):
    # `import simclr` alone, and its public names resolve on first use (then torch is there, as it must be)
    code = ("import sys, simclr; before = [m for m in %r if m in sys.modules]; simclr.LARS, simclr.nt_xent; "
            "simclr.runs.index; print(before, 'torch' in sys.modules)" % (HEAVY,))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env(),
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[]", "True"]
    # `python -m simclr --version`, as Python's own import log sees it (every module the process imported)
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "simclr", "--version"], capture_output=True,
                       text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, f"simclr {VERSION}\n"), r.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "simclr.cli" in imported  # the log is what we think it is
    assert not {m for m in imported if m.split(".")[0] in HEAVY}


def test_the_static_name_tables_agree_with_the_registries(tmp_path, monkeypatch):
    # the ResNets options accept are exactly those models builds, in the same order (the help lists them)
    assert names.RESNETS == tuple(models.ENCODERS)
    # the datasets options accept are exactly those get_dataset knows: each known name fails for a missing
    # file, never as an unknown dataset; any other name is unknown
    assert set(names.DATASETS) == set(datasets.NATIVE_SIZE)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    monkeypatch.delenv("IMAGENET_PATH", raising=False)
    for data in names.DATASETS:
        with pytest.raises(DataError) as e:  # no files under the empty DATA_ROOT
            datasets.get_dataset(data, "test", data_path=str(tmp_path / "none"))
        assert "unknown dataset" not in str(e.value), (data, e.value)
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        datasets.get_dataset("mnist", "test")
