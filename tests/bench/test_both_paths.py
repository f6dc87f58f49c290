"""`simclr bench` runs both paths on CPU and reports the numbers it promises."""
from __future__ import annotations

import json
import os
import time

import pytest
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from simclr.cli import main


@pytest.mark.slow  # a real process or a long wait: `make test` runs it, `make test-fast` leaves it out
def test_bench_prints_both_paths_and_the_ratio(tmp_path, capsys, data_root):
    """The numbers are checked against clocks the test reads itself, not against bench's own formulas.

    Global optimizer-step hooks (they see every step of both paths) count the steps, stamp when each
    update begins and ends, and stretch each update by STEP_S (warm-up updates by WARM_S more). A path's
    timed interval contains [its first timed update begins, its last update ends] and lies within
    [its last warm-up update ended, the next path's first update begins (or the call returned)]. Both
    bound images/s and ms/step; counting warm-up steps as timed, or timing the warm-up, falls outside."""
    steps, warmup, batch, step_s, warm_s = 2, 1, 16, 0.5, 2.5
    per_path = warmup + steps
    begun, ended, kinds = [], [], []

    def begin(optimizer, args, kwargs):
        begun.append(time.perf_counter())

    def end(optimizer, args, kwargs):
        time.sleep(step_s + (warm_s if len(ended) % per_path < warmup else 0))
        kinds.append(type(optimizer).__name__)
        ended.append(time.perf_counter())

    hooks = [register_optimizer_step_pre_hook(begin), register_optimizer_step_post_hook(end)]
    out = tmp_path / "bench.json"
    try:
        rc = main(["bench", "--arch", "resnet18", "--width", "8", "--batch_size", str(batch), "--steps", str(steps),
                   "--warmup", str(warmup), "--train_subset", "64", "--device", "cpu", "--workers", "0",
                   "--isolate", "off", "--json", str(out)])  # the hooks see this process's steps
    finally:
        returned = time.perf_counter()
        for h in hooks:
            h.remove()
    text = capsys.readouterr().out
    assert rc == 0
    assert kinds == ["LARS"] * (2 * per_path)  # both paths, warm-up and timed steps, nothing more
    assert "reference" in text and "fast" in text and "speed-up (fast / reference images/s)" in text
    res = json.loads(out.read_text())
    fast, ref = res["results"]  # the fast path runs first
    assert (fast["path"], ref["path"]) == ("fast", "reference")
    assert ref["precision"] == "fp32" and ref["lars"] == "plain" and fast["lars"] == "foreach"
    assert res["failed"] == [] and fast["status"] == ref["status"] == "ok"
    for i, r in enumerate((fast, ref)):
        first, last = i * per_path + warmup, (i + 1) * per_path - 1
        inner = ended[last] - begun[first]
        outer = (begun[last + 1] if i == 0 else returned) - ended[first - 1]
        assert steps * batch / outer <= r["images_per_s"] <= steps * batch / inner, (r, inner, outer)
        assert inner * 1000 / steps <= r["ms_per_step"] <= outer * 1000 / steps, (r, inner, outer)
        assert 0 <= r["data_wait_frac"] <= 1
        # the printed table row carries the same numbers as the JSON
        row = next(ln for ln in text.splitlines() if ln.startswith(r["path"]) and "LARS" in ln)
        assert row.split()[1:3] == [f"{r['images_per_s']:.1f}", f"{r['ms_per_step']:.1f}"], row
    assert f"{res['speedup']:.2f}x" in text and res["speedup"] > 0
    assert res["args"]["steps"] == steps and res["args"]["batch_size"] == batch and res["complete"] is True
    assert res["commit"] and res["device"].startswith("CPU")


def test_bench_data_only_times_the_input_pipelines(capsys, data_root):
    rc = main(["bench", "--data_only", "--batch_size", "16", "--steps", "2", "--warmup", "1", "--train_subset", "64",
               "--device", "cpu", "--workers", "0", "--arch", "resnet18", "--width", "8", "--isolate", "off"])
    text = capsys.readouterr().out
    assert rc == 0 and text.count("input pipeline only") >= 2 and "speed-up" in text


def test_bench_bad_input_is_one_line(capsys):
    assert main(["bench", "--paths", "reference,turbo"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --paths: unknown path 'turbo'; allowed: fast, reference, fast-step"
    assert main(["bench", "--steps", "many"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: option 'steps' expects an integer, got 'many' (on the command line)"


@pytest.mark.slow  # four fresh processes
def test_on_a_cpu_each_run_has_a_fresh_process_of_its_own(tmp_path, capsys, monkeypatch, data_root):
    """--isolate (auto: on a CPU): each timed run comes from a process of its own, so the fast path's process-wide
    set-up (the kept-memory allocator, on a CPU with native bf16) never reaches the spec's path, which runs with
    the C library's defaults as the spec's program does."""
    from simclr.runtime import cpu_native_bf16
    monkeypatch.delenv("SIMCLR_CPU_BF16", raising=False)  # this machine's own CPU defaults, as a user's bench
    out = tmp_path / "b.json"
    rc = main(["bench", "--arch", "resnet18", "--width", "8", "--batch_size", "16", "--steps", "1", "--warmup", "1",
               "--train_subset", "64", "--device", "cpu", "--workers", "0", "--repeat", "2", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "each run in a fresh process of its own" in text
    res = json.loads(out.read_text())
    runs = res["all_runs"]
    # with --repeat, the spread of the ratios pair by pair (run k of each path) beside the medians' ratio
    pairs = [f["images_per_s"] / r["images_per_s"] for f, r in zip(runs["fast"], runs["reference"])]
    assert res["speedup_pairs"] == pytest.approx(pairs) and len(pairs) == 2
    assert f"(pair by pair: {min(pairs):.2f}x to {max(pairs):.2f}x over 2 pairs)" in text
    pids = [r["process"] for p in ("fast", "reference") for r in runs[p]]
    assert len(set(pids)) == 4 and os.getpid() not in pids
    assert [r["cpu_allocator"] for r in runs["reference"]] == ["default", "default"]
    assert {r["cpu_allocator"] != "default" for r in runs["fast"]} == {bool(cpu_native_bf16())}


def test_fast_step_trains_every_step_on_one_batch_and_reports_the_ceiling(tmp_path, capsys, data_root):
    """The fast-step path is the fast path's step with no input pipeline: every step's input is the same batch
    (the fast path's inputs differ step to step), and the ceiling is its images/s over the reference's."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    from simclr.models import SimCLRModel
    inputs: list = []

    def seen(module, args):
        if isinstance(module, SimCLRModel):
            inputs.append(args[0].detach().float().clone())

    hook = register_module_forward_pre_hook(seen)
    out = tmp_path / "bench.json"
    try:
        rc = main(["bench", "--arch", "resnet18", "--width", "8", "--batch_size", "8", "--steps", "2", "--warmup", "1",
                   "--train_subset", "32", "--device", "cpu", "--workers", "0", "--isolate", "off",
                   "--paths", "fast-step,fast", "--json", str(out)])
    finally:
        hook.remove()
    text = capsys.readouterr().out
    assert rc == 0
    assert len(inputs) == 6  # fast (3 steps), then fast-step (3 steps): the order of PATHS
    fast, fixed = inputs[:3], inputs[3:]
    assert all(x.equal(fixed[0]) for x in fixed[1:])
    assert not fast[0].equal(fast[1]) and not fast[1].equal(fast[2])
    res = json.loads(out.read_text())
    assert [r["path"] for r in res["results"]] == ["fast", "fast-step"]
    assert res["ceiling"] is None and res["speedup"] is None  # no reference path to divide by
    assert "one fixed batch, no input pipeline" in text


def test_ceiling_is_fast_step_over_reference(tmp_path, capsys, data_root):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--arch", "resnet18", "--width", "8", "--batch_size", "8", "--steps", "1", "--warmup", "1",
               "--train_subset", "32", "--device", "cpu", "--workers", "0", "--isolate", "off",
               "--paths", "reference,fast-step", "--json", str(out)])
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    by = {r["path"]: r["images_per_s"] for r in res["results"]}
    assert rc == 0 and res["ceiling"] == pytest.approx(by["fast-step"] / by["reference"])
    assert f"ceiling (fast-step / reference images/s: the fast path's step with no input pipeline): " \
           f"{res['ceiling']:.2f}x" in text


def test_fast_step_has_no_input_pipeline_to_time(capsys):
    assert main(["bench", "--data_only", "--paths", "fast,fast-step"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --data_only times the input pipelines, and the fast-step path has none")
