"""The runs table (`simclr runs`, simclr.runs.cli.format_table) and examples/read_runs.py: its steps, throughput and
CSV columns, garbage lines in metrics.jsonl skipped and counted, and where the example writes its figure."""
from __future__ import annotations

import json
import runpy
import sys

import pandas as pd
from tests.conftest import REPO, run_cli

from simclr.runs.cli import format_table


def _fake_run(root, rid="r1"):
    run = root / "t" / rid
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: t\narch: resnet18\niters: 30\ntemperature: 0.5\n")
    (run / "status.json").write_text(json.dumps({"status": "finished", "started": 1.0, "updated": 2.0, "step": 30}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "epoch": s / 10, "loss": 5.0 - s / 10,
                                                           "images_per_s": 0.4}) + "\n" for s in (10, 20, 30)))
    return run


def test_read_runs_writes_its_figure_next_to_the_runs(tmp_path, monkeypatch):
    root = tmp_path / "logs"
    _fake_run(root)
    cwd = tmp_path / "clone"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["read_runs.py", "--root", str(root)])
    runpy.run_path(str(REPO / "examples" / "read_runs.py"), run_name="__main__")
    assert (root / "runs.png").is_file()
    assert list(cwd.iterdir()) == []  # nothing in the folder it was run from (the repo root, usually)


def test_the_steps_column_of_a_run_with_unknown_progress():
    df = pd.DataFrame({"step": [float("nan"), 120.0, float("nan")], "iters": [300.0, 300.0, float("nan")]})
    assert format_table(df, ["steps"]).split()[1:] == ["?/300", "120/300"]  # third row: blank


def test_slow_throughput_is_not_zero():
    from simclr.progress import rate
    assert [rate(v) for v in (0.42, 3.14159, 56.78, 1234.4)] == ["0.42", "3.14", "56.8", "1234"]
    df = pd.DataFrame({"images_per_s": [0.4]})
    assert format_table(df, ["images_per_s"]).split()[-1] == "0.4"


def test_the_csv_keeps_the_steps(tmp_path):
    _fake_run(tmp_path / "logs")
    r = run_cli("runs", "--root", tmp_path / "logs", "--format", "csv", "--columns", "id,steps,loss")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.strip().splitlines()
    assert header.split(",") == ["id", "step", "iters", "loss"]
    assert row.split(",")[:3] == ["r1", "30", "30"]


def test_garbage_lines_in_metrics_jsonl_are_skipped_and_counted_by_simclr_runs(trained_run, tmp_path):
    root = tmp_path / "logs"
    run = trained_run  # under root
    good = (run / "metrics.jsonl").read_text()
    records = [json.loads(ln) for ln in good.splitlines()]
    last_loss = [r["loss"] for r in records if "loss" in r][-1]
    knn = [r["knn_top1"] for r in records if "knn_top1" in r][-1]
    garbage = ['{"step": 1e999, "loss": 1.0}',       # inf, as a crashed writer once left it
               '{"step": 2, "loss": NaN, "lr": 0.1}', '{"step": "x", "loss": "abc"}', '["loss", 1]', '"loss"',
               '{"step": 2, "knn_top1": Infinity}', '{"step": 1e999}', '{"step": 3, "loss": 0.']  # truncated
    (run / "metrics.jsonl").write_text(good + "\n".join(garbage))
    r = run_cli("runs", "--root", root, "--columns", "id,status,steps,loss,knn,metrics_skipped")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    (row,) = r.stdout.splitlines()[1:]  # the run's row, its values from the good lines
    assert row.split() == [run.name, "finished", "4/4", f"{last_loss:.4g}", f"{knn:.4g}", "7"]
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    # the summary reads the lines with a loss (from the end) and the kNN lines: 7 of the 8 are among them
    assert len(warnings) == 1 and f"{run}/metrics.jsonl: skipped 7 unreadable" in warnings[0], r.stderr
    r = run_cli("report", run, "--no_pictures")  # the figures read the same file
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
