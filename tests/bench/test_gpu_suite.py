"""benchmarks/gpu_suite.sh: the smoke mode runs every part on the CPU and writes every JSON file the GPU mode
writes; a failing part fails the suite (exit 1, its status in the summary); the GPU mode's part limits sum below
six minutes. The suite is a shell script: here it runs as the process a user starts."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_suite.sh"


def _suite(mode: str, out, **env) -> subprocess.CompletedProcess:
    knobs = ("TTA_MINUTES", "SUITE_ONLY", "EXTRA_BENCH", "EXTRA_TTA")  # the caller's shell must not leak in
    e = {k: v for k, v in os.environ.items() if k not in knobs}
    e.update(OUT=str(out), PY=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), mode], capture_output=True, text=True, timeout=900, env=e, cwd=REPO)


def _plan(tmp_path) -> dict:
    r = _suite("plan", tmp_path)
    assert r.returncode == 0, r.stderr
    parts = {}
    for line in r.stdout.splitlines():
        m = re.fullmatch(r"part (\w+) limit_s (\d+) json (\S+)", line)
        if m:
            parts[m[1]] = (int(m[2]), None if m[3] == "-" else m[3])
    total = int(re.search(r"total_limit_s (\d+)", r.stdout)[1])
    assert total == sum(limit for limit, _ in parts.values())
    return parts


def test_gpu_mode_part_limits_sum_below_six_minutes(tmp_path):
    parts = _plan(tmp_path)
    assert set(parts) == {"env", "cache", "bench_resnet18", "bench_resnet50", "tta_resnet18"}
    assert sum(limit for limit, _ in parts.values()) < 360
    # the script's own table (parsed from its text) is what the plan printed, except the time-to-accuracy
    # limit, which the script derives from TTA_MINUTES (default 1.75: its budget + 20 s)
    text = SCRIPT.read_text()
    table = dict(re.findall(r"\[(\w+)\]=(\d+)", re.search(r"declare -A GPU_LIMIT=\((.*)\)", text)[1]))
    assert {k: int(v) for k, v in table.items() if k != "tta_resnet18"} == {
        k: limit for k, (limit, _) in parts.items() if k != "tta_resnet18"}
    default_minutes = float(re.search(r"TTA_MINUTES=\$\{TTA_MINUTES:-([\d.]+)\}\n  WORKERS", text)[1])
    assert parts["tta_resnet18"][0] == int(default_minutes * 60 + 20)
    # a longer time-to-accuracy budget moves its limit (and the plan shows it)
    r = _suite("plan", tmp_path, TTA_MINUTES="3")
    assert "part tta_resnet18 limit_s 200 " in r.stdout


def test_a_failing_part_fails_the_suite_with_a_summary(tmp_path):
    r = _suite("smoke", tmp_path, SUITE_ONLY="env,bench_resnet18", EXTRA_BENCH="--steps many")
    assert r.returncode == 1, r.stdout[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False and summary["mode"] == "smoke"
    status = {p["name"]: p["status"] for p in summary["parts"]}
    assert status == {"env": "ok", "bench_resnet18": "failed (exit 2)"}
    assert "FAILED: 1 of 2 parts failed" in r.stdout
    assert re.search(r"^bench_resnet18\s+failed \(exit 2\)", r.stdout, re.M)
    assert "error: option 'steps' expects an integer" in (tmp_path / "suite.log").read_text()


def test_an_unknown_mode_is_one_error_line(tmp_path):
    r = _suite("fast", tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: mode must be gpu, smoke or plan, got 'fast'"


@pytest.mark.slow
def test_smoke_mode_writes_every_json_the_gpu_mode_writes(tmp_path, data_root):
    r = _suite("smoke", tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    expected = {json_name for _, json_name in _plan(tmp_path).values() if json_name} | {"summary.json"}
    assert expected == {"bench_resnet18.json", "bench_resnet50.json", "tta_resnet18.json", "summary.json"}
    got = {name: json.loads((tmp_path / name).read_text()) for name in expected}
    assert "torch" in (tmp_path / "env.txt").read_text()
    summary = got["summary.json"]
    assert summary["ok"] is True and [p["name"] for p in summary["parts"]] == [
        "env", "cache", "bench_resnet18", "bench_resnet50", "tta_resnet18"]
    assert all(p["status"] == "ok" and 0 <= p["seconds"] <= p["limit_s"] for p in summary["parts"])
    for name, arch in (("bench_resnet18.json", "resnet18"), ("bench_resnet50.json", "resnet50")):
        b = got[name]
        assert b["complete"] is True and b["failed"] == [] and b["args"]["arch"] == arch
        assert [x["path"] for x in b["results"]] == ["fast", "reference"]
        assert all(x["status"] == "ok" and x["images_per_s"] > 0 and 0 <= x["data_wait_frac"] <= 1
                   for x in b["results"])
        assert b["speedup"] == pytest.approx(b["results"][0]["images_per_s"] / b["results"][1]["images_per_s"])
    t = got["tta_resnet18.json"]
    assert t["steps"] >= 1 and 0 <= t["knn_top1"] <= 100 and t["budget_s"] == 45
    assert 1 <= len(t["curve"]) <= 2 and t["curve"][-1]["knn_top1"] == t["knn_top1"]
    assert set(t["minutes_to_knn"]) >= {"80"}
