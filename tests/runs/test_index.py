"""The run index over hand-made run folders: every status, half-written files, eval links, speed, CLI."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from simclr import rundir, runs
from simclr.cli import main as cli_main

HOST = socket.gethostname()


def make_run(root: Path, name: str, run_id: str, status: dict | None = None, config: dict | None = None,
             metrics: list | None = None, tail: str = "", evals: dict | None = None) -> Path:
    """A run folder written by hand, the way the trainer lays it out (or a broken version of it)."""
    p = root / name / run_id
    p.mkdir(parents=True)
    if config is not None:
        (p / "config.yaml").write_text(yaml.safe_dump(config))
    if status is not None:
        (p / "status.json").write_text(json.dumps(status) if isinstance(status, dict) else status)
    if metrics is not None or tail:
        (p / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics or []) + tail)
    for fname, ev in (evals or {}).items():
        (p / fname).write_text(json.dumps(ev))
    return p


def cfg(**over) -> dict:
    base = dict(name="exp", data="cifar10", arch="resnet18", width=8, batch_size=32, iters=10, lr=0.5,
                temperature=0.5, problem="sim-clr", seed=0)
    base.update(over)
    return base


def train_recs(steps, loss0=6.0, ips=100.0) -> list:
    return [{"step": s, "epoch": s / 8, "loss": loss0 - 0.1 * s, "contrast_acc": 0.01 * s, "lr": 0.5,
             "images_per_s": ips + s, "data_time_frac": 0.1} for s in steps]


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def zoo(tmp_path):
    """One folder per situation; returns (root, {run_id: expected status})."""
    root = tmp_path / "logs"
    now = time.time()
    exp = {}
    knn = [{"step": 0, "epoch": 0.0, "knn_top1": 30.0, "knn_top5": 70.0},
           {"step": 5, "epoch": 0.6, "knn_top1": 41.0, "knn_top5": 80.0},
           {"step": 10, "epoch": 1.2, "knn_top1": 39.5, "knn_top5": 81.0}]
    fin = make_run(root, "exp", "finished", {"status": "finished", "pid": 1, "host": HOST, "started": now - 100,
                                             "updated": now - 40, "step": 10},
                   cfg(temperature=0.2), train_recs(range(1, 11)) + knn)
    (fin / "checkpoints").mkdir()
    (fin / "checkpoints" / "checkpoint-00000010.pt").write_bytes(b"x")
    (fin / "checkpoints" / "checkpoint-00000010.json").write_text(json.dumps({"sha256": "abc123", "step": 10}))
    exp["finished"] = "finished"
    make_run(root, "exp", "failed", {"status": "failed", "pid": 1, "host": HOST, "started": now - 50,
                                     "updated": now - 45, "step": 3, "error": "non-finite loss at step 3"},
             cfg(lr=100.0), train_recs(range(1, 3)))
    exp["failed"] = "failed"
    make_run(root, "exp", "stopped", {"status": "interrupted", "pid": 1, "host": HOST, "started": now - 50,
                                      "updated": now - 45, "step": 4}, cfg(), train_recs(range(1, 5)))
    exp["stopped"] = "interrupted"
    # killed with kill -9: status still says running, but the process is gone
    make_run(root, "exp", "deadpid", {"status": "running", "pid": dead_pid(), "host": HOST, "started": now - 20,
                                      "updated": now - 5, "step": 2}, cfg(), train_recs(range(1, 3)))
    exp["deadpid"] = "interrupted"
    # on another machine: only the heartbeat tells; an hour old is dead
    make_run(root, "exp", "stale", {"status": "running", "pid": 4242, "host": "node-17", "started": now - 7200,
                                    "updated": now - 3600, "step": 2}, cfg(), train_recs(range(1, 3)))
    exp["stale"] = "interrupted"
    make_run(root, "exp", "remote", {"status": "running", "pid": 4242, "host": "node-17", "started": now - 60,
                                     "updated": now - 10, "step": 2}, cfg(), train_recs(range(1, 3)))
    exp["remote"] = "running"
    make_run(root, "exp", "alive", {"status": "running", "pid": os.getpid(), "host": HOST, "started": now - 1,
                                    "updated": now, "step": 2}, cfg(), train_recs(range(1, 3)))
    exp["alive"] = "running"
    # half-written: a truncated last line in metrics.jsonl
    make_run(root, "exp", "truncated", {"status": "running", "pid": os.getpid(), "host": HOST,
                                        "started": now - 1, "updated": now, "step": 3}, cfg(),
             train_recs(range(1, 4)), tail='{"step": 4, "epoch": 0.5, "loss": 5.')
    exp["truncated"] = "running"
    # no config.yaml (crashed before writing it)
    make_run(root, "other", "noconfig", {"status": "failed", "pid": 1, "host": HOST, "started": now - 5,
                                         "updated": now - 4, "error": "DataError: cifar10 not found"})
    exp["noconfig"] = "failed"
    # a half-written status.json, and a folder with a config only
    make_run(root, "other", "badstatus", '{"status": "runn', cfg())
    exp["badstatus"] = "unknown"
    make_run(root, "other", "configonly", None, cfg())
    exp["configonly"] = "unknown"
    # an evaluation run of the finished run's checkpoint
    ev = {"protocol": "linear", "top1": 55.5, "top5": 90.0, "per_class": {"airplane": 60.0},
          "encoder": {"path": str(fin / "checkpoints" / "checkpoint-00000010.pt"), "sha256": "abc123"}}
    make_run(root, "lin", "eval1", {"status": "finished", "pid": 1, "host": HOST, "started": now - 30,
                                    "updated": now - 20}, dict(problem="eval", data="cifar10", protocol="linear"),
             [], evals={"eval.json": ev})
    exp["eval1"] = "finished"
    # things that are not runs must be ignored
    (root / "exp" / "finished" / "tb").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a run")
    return root, exp


def test_index_lists_every_run_with_the_right_status(zoo):
    root, exp = zoo
    df = runs.index(root)
    got = dict(zip(df["id"], df["status"]))
    assert got == exp
    by = df.set_index("id")
    assert "non-finite loss" in by.loc["failed", "error"]
    assert "gone" in by.loc["deadpid", "error"]
    assert "heartbeat" in by.loc["stale", "error"]
    assert by.loc["noconfig", "name"] == "other"  # no config: named by its parent folder
    assert by.loc["noconfig", "error"] == "DataError: cifar10 not found"


def test_index_summaries_match_the_records(zoo):
    root, _ = zoo
    by = runs.index(root).set_index("id")
    f = by.loc["finished"]
    # best kNN after training, the random-init value apart (hand-picked from the records above)
    assert f["knn"] == 41.0 and f["knn_init"] == 30.0 and f["knn_last"] == 39.5
    assert f["loss"] == pytest.approx(6.0 - 0.1 * 10) and f["step"] == 10 and f["iters"] == 10
    assert f["images_per_s"] == pytest.approx(105.5)  # median of 101..110
    assert f["temperature"] == 0.2 and f["arch"] == "resnet18"
    assert f["duration"].total_seconds() == pytest.approx(60, abs=1)
    # the half-written line is skipped: the last complete record is step 3
    t = by.loc["truncated"]
    assert t["step"] == 3 and t["loss"] == pytest.approx(6.0 - 0.3)
    # the linear evaluation of the finished run's checkpoint shows on both rows
    assert by.loc["eval1", "kind"] == "eval" and by.loc["eval1", "linear"] == 55.5
    assert f["linear"] == 55.5
    assert by.loc["stopped", "linear"] != by.loc["stopped", "linear"]  # NaN: no evaluation


def test_eval_linked_by_checksum_when_path_is_gone(tmp_path):
    root = tmp_path / "logs"
    now = time.time()
    fin = make_run(root, "exp", "a", {"status": "finished", "started": now, "updated": now}, cfg(), [])
    (fin / "checkpoints").mkdir()
    (fin / "checkpoints" / "checkpoint-00000010.json").write_text(json.dumps({"sha256": "feed"}))
    make_run(root, "exp", "b", {"status": "finished", "started": now, "updated": now}, cfg(), [])
    ev = {"protocol": "fast-linear", "top1": 42.0, "encoder": {"path": "/elsewhere/model.pt", "sha256": "feed"}}
    make_run(root, "lin", "e", {"status": "finished"}, None, None, evals={"eval.json": ev})
    by = runs.index(root).set_index("id")
    assert by.loc["a", "linear"] == 42.0
    assert by.loc["b", "linear"] != by.loc["b", "linear"]


def _running(pid: int, started: float) -> dict:
    now = time.time()
    return {"status": "running", "pid": pid, "host": HOST, "started": started, "updated": now}


def test_liveness_follows_a_real_process(tmp_path):
    """A run whose status.json names a live process is running; killed, it is interrupted (zombie or reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = make_run(tmp_path / "logs", "exp", "live", _running(proc.pid, time.time()), cfg(),
                       train_recs(range(1, 3)))
        assert runs.index(tmp_path / "logs").set_index("id").loc["live", "status"] == "running"
        proc.kill()
        deadline = time.time() + 10  # killed but not yet reaped: a zombie is no live run either
        while runs.effective_status(_running(proc.pid, time.time()))[0] != "interrupted" and time.time() < deadline:
            time.sleep(0.05)
        status, why = runs.effective_status(json.loads((run / "status.json").read_text()))
        assert status == "interrupted" and f"process {proc.pid}" in why and "gone" in why
        proc.wait()
        row = runs.index(tmp_path / "logs").set_index("id").loc["live"]
        assert row["status"] == "interrupted" and "gone" in row["error"]
    finally:
        proc.kill()
        proc.wait()


def test_pid_reuse_is_not_mistaken_for_the_run():
    """The pid is alive, but its process was created long after the run started: another program got the pid."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        status, why = runs.effective_status(_running(proc.pid, time.time() - 30 * 86400))
        assert status == "interrupted" and "another process" in why
        assert runs.effective_status(_running(proc.pid, time.time()))[0] == "running"
    finally:
        proc.kill()
        proc.wait()


def test_heartbeat_thread_keeps_a_live_run_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.05)
    rd = rundir.RunDir(tmp_path / "r")
    rd.set_status("running", step=0)
    first = json.loads((rd.path / "status.json").read_text())["updated"]
    deadline = time.time() + 10
    while json.loads((rd.path / "status.json").read_text())["updated"] == first and time.time() < deadline:
        time.sleep(0.05)
    assert json.loads((rd.path / "status.json").read_text())["updated"] > first
    rd.set_status("finished", step=1)
    time.sleep(0.3)  # a stopped heartbeat must not flip the final status back or touch the file
    st = json.loads((rd.path / "status.json").read_text())
    time.sleep(0.3)
    assert json.loads((rd.path / "status.json").read_text()) == st and st["status"] == "finished"
    rd.close()


def test_index_of_1000_runs_is_fast(tmp_path):
    root = tmp_path / "many"
    now = time.time()
    config_text = yaml.safe_dump(dict(cfg(), **{f"opt_{i}": i for i in range(50)}))  # ~60 keys like a real one
    lines = "".join(json.dumps(r) + "\n" for r in train_recs(range(1, 201)))
    lines += json.dumps({"step": 200, "epoch": 25.0, "knn_top1": 50.0, "knn_top5": 90.0}) + "\n"
    status = json.dumps({"status": "finished", "pid": 1, "host": HOST, "started": now - 100, "updated": now})
    for i in range(1000):
        p = root / f"exp{i % 10}" / f"run{i:04d}"
        p.mkdir(parents=True)
        (p / "config.yaml").write_text(config_text)
        (p / "status.json").write_text(status)
        (p / "metrics.jsonl").write_text(lines)
    runs.index(root / "exp0")  # warm the imports (pandas) so the timing is the index itself
    t = time.perf_counter()
    df = runs.index(root)
    dt = time.perf_counter() - t
    print(f"index of 1000 runs: {dt:.2f} s")
    assert len(df) == 1000 and (df.knn == 50.0).all() and (df.step == 200).all()
    assert dt < 10.0  # ~1 s on an idle 2-core box; generous for a loaded CI machine


def test_runs_command_filters_sorts_and_picks_columns(zoo, capsys):
    root, _ = zoo
    make_run(root, "c100", "x", {"status": "finished", "started": 1, "updated": 2}, cfg(data="cifar100"),
             [{"step": 5, "epoch": 1.0, "knn_top1": 99.0}])
    assert cli_main(["runs", "--root", str(root), "--where", "data=cifar10", "--where", "kind=pretrain",
                     "--sort", "knn", "--columns", "id,lr,temperature,knn"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["id", "lr", "temperature", "knn"]
    ids = [ln.split()[0] for ln in out[1:]]
    assert ids[0] == "finished"  # the only run with a kNN value, best first
    assert "x" not in ids and "eval1" not in ids  # filtered out (cifar100; an eval run)
    assert cli_main(["runs", "--root", str(root)]) == 0
    table = capsys.readouterr().out
    assert "10/10" in table and "interrupted" in table  # steps done/total
    assert cli_main(["runs", "--root", str(root), "--columns", "id,knnn"]) == 2
    assert "unknown column 'knnn'" in capsys.readouterr().err
    assert cli_main(["runs", "--root", str(tmp_missing := root / "nope")]) == 2
    assert str(tmp_missing) in capsys.readouterr().err


def test_index_compat_and_package_attribute(zoo):
    import simclr
    root, exp = zoo
    assert len(simclr.runs.Index(root).info()) == len(exp)
    df = simclr.runs.index(root, where={"data": "cifar10", "kind": "pretrain"})
    assert set(df.id) == {k for k in exp if k not in ("noconfig", "eval1")}


def test_metrics_lines_are_strict_json_even_for_non_finite_values(tmp_path):
    import json as _json

    from simclr.rundir import RunDir

    run = RunDir(tmp_path / "r", tensorboard=False)
    run.log_metrics({"step": 3, "loss": float("nan"), "lr": float("inf"), "contrast_acc": 0.5})
    line = (tmp_path / "r" / "metrics.jsonl").read_text().strip()
    rec = _json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # rejects NaN/Infinity
    assert rec == {"step": 3, "loss": None, "lr": None, "contrast_acc": 0.5}


def test_run_folder_files_are_readable_by_the_team(tmp_path):
    """Atomically written files get the umask's permissions like any open(), not mkstemp's private 0o600:
    a shared runs folder must stay readable to the index and report of other users."""
    old = os.umask(0o022)
    try:
        run = rundir.RunDir(tmp_path / "r", tensorboard=False)
        run.set_status("finished", step=1)
        run.write_json("env.json", {"host": HOST})
        run.log_metrics({"step": 1, "loss": 1.0})
    finally:
        os.umask(old)
    for name in ("status.json", "env.json", "metrics.jsonl"):
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == 0o644, name
    temps = [p.name for p in (tmp_path / "r").iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert temps == []  # no temp file


def _evals_beside_the_zoo(root: Path) -> None:
    """A kNN evaluation of the finished run's checkpoint and a random-init (baseline) linear evaluation."""
    now = time.time()
    ckpt = str(root / "exp" / "finished" / "checkpoints" / "checkpoint-00000010.pt")
    knn_ev = {"protocol": "knn", "top1": 47.5, "top5": 88.0,
              "encoder": {"path": ckpt, "sha256": "abc123", "arch": "resnet18", "random_init": False}}
    make_run(root, "knn", "knneval", {"status": "finished", "pid": 1, "host": HOST, "started": now - 10,
                                      "updated": now - 9},
             dict(problem="eval", data="cifar10", protocol="knn", arch="linear", batch_size=1024, iters=5000,
                  temperature=0.1, encoder_ckpt=ckpt), [], evals={"eval.json": knn_ev})
    base_ev = {"protocol": "linear", "top1": 20.0, "top5": 60.0,
               "encoder": {"path": "", "sha256": "", "arch": "resnet50", "random_init": True}}
    make_run(root, "lin", "baseline", {"status": "finished", "pid": 1, "host": HOST, "started": now - 3,
                                       "updated": now - 2},
             dict(problem="eval", data="cifar10", protocol="linear", arch="linear", batch_size=1024, iters=5000,
                  temperature=0.1, encoder_ckpt="", encoder_arch="resnet50"), [], evals={"eval.json": base_ev})


def test_eval_rows_have_a_kind_their_result_and_their_own_columns(zoo):
    import pandas as pd
    root, _ = zoo
    _evals_beside_the_zoo(root)
    by = runs.index(root).set_index("id")
    k = by.loc["knneval"]
    assert (k["kind"], k["protocol"], k["knn"], k["knn_top5"]) == ("eval", "knn", 47.5, 88.0)
    assert k["arch"] == "resnet18" and k["head"] == "linear"  # the evaluated encoder, not the classifier
    assert pd.isna(k["temperature"]) and k["knn_tau"] == 0.1  # the kNN tau is not NT-Xent's temperature
    assert pd.isna(k["iters"]) and pd.isna(k["batch_size"]) and pd.isna(k["step"])  # kNN trains nothing
    assert k["encoder_run"] == str(root / "exp" / "finished")
    f = by.loc["finished"]
    assert f["kind"] == "pretrain" and f["temperature"] == 0.2 and f["knn"] == 41.0 and pd.isna(f["knn_tau"])
    b = by.loc["baseline"]
    assert (b["kind"], b["protocol"], b["linear"], b["arch"]) == ("baseline", "linear", 20.0, "resnet50")
    assert f["linear"] == 55.5  # a baseline is linked to no pretraining run
    assert by.loc["eval1", "kind"] == "eval" and by.loc["eval1", "iters"] is pd.NA
    assert (b["step"], b["iters"], b["batch_size"]) == (5000, 5000, 1024)  # a finished SGD head: all its steps
    assert str(by["batch_size"].dtype) == "Int64" and by.loc["finished", "batch_size"] == 32
    assert set(runs.index(root, where={"batch_size": "32"}).id) == {
        i for i in by.index if by.loc[i, "batch_size"] is not pd.NA and by.loc[i, "batch_size"] == 32}


def test_runs_table_kind_filter_newest_first_and_plain_machine_formats(zoo, capsys):
    import csv
    import io
    root, _ = zoo
    _evals_beside_the_zoo(root)
    assert cli_main(["runs", "--root", str(root), "--columns", "id,kind,protocol,knn,linear"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["id", "kind", "protocol", "knn", "linear"]
    rows = [ln.split() for ln in out[1:]]
    ids = [r[0] for r in rows]
    # newest first (by start time; ties keep the path order), runs without a start time last
    assert ids[:3] == ["alive", "truncated", "baseline"] and ids[-2:] == ["badstatus", "configonly"]
    assert ["knneval", "eval", "knn", "47.5"] in rows  # an eval row shows its protocol and its result
    assert ["eval1", "eval", "linear", "55.5"] in rows
    assert cli_main(["runs", "--root", str(root), "--columns", "id,steps", "--kind", "eval"]) == 0
    assert capsys.readouterr().out.split()[2:] == ["knneval", "eval1"]  # no "/5000": kNN took no steps
    assert cli_main(["runs", "--root", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[:4] == ["id", "name", "kind", "status"]
    for kind, want in (("baseline", {"baseline"}), ("eval", {"eval1", "knneval"})):
        assert cli_main(["runs", "--root", str(root), "--kind", kind, "--columns", "id"]) == 0
        assert set(capsys.readouterr().out.split()[1:]) == want
    assert cli_main(["runs", "--root", str(root), "--kind", "evals"]) == 2
    assert "allowed: all, pretrain, eval, baseline" in capsys.readouterr().err
    # machine formats: durations in seconds, ISO times, numbers as numbers
    assert cli_main(["runs", "--root", str(root), "--format", "csv", "--columns", "id,duration,started,step"]) == 0
    rec = {r["id"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert float(rec["finished"]["duration"]) == pytest.approx(60, abs=1) and rec["finished"]["step"] == "10"
    assert rec["finished"]["started"][10] == "T" and "days" not in rec["finished"]["duration"]
    assert cli_main(["runs", "--root", str(root), "--format", "json", "--columns", "id,duration,knn"]) == 0
    js = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert js["finished"]["duration"] == pytest.approx(60, abs=1) and js["knneval"]["knn"] == 47.5
