"""benchmarks/time_to_accuracy.py keeps to its budget (setup counts), says what it is doing, records a kNN curve,
and stops cleanly on Ctrl-C. The budget logic is checked with a fake clock: no wall-clock assertion."""
from __future__ import annotations

import importlib.util
import json
import time

import pytest

from tests.conftest import REPO


def _tta():
    spec = importlib.util.spec_from_file_location("time_to_accuracy", REPO / "benchmarks" / "time_to_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tta = _tta()


class FakeClock:
    """Time moves only when the loop's work is done: a step costs 1 s, an evaluation 2 s."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_training_stops_at_the_deadline_and_curve_evaluations_count():
    clock, fracs, said = FakeClock(), [], []

    def do_step(step, frac):
        fracs.append(frac)
        clock.t += 1.0

    def evaluate():
        clock.t += 2.0
        return 10.0 * (len(said) + 1)

    tr = tta.train_for_budget(do_step, clock, 10.5, sync_every=1, curve_points=3, evaluate=evaluate,
                              say=said.append)
    # by hand: step 1 ends at t=1 (first step: the schedule starts there, span 9.5, marks at 9.5/3 and 19/3 s of
    # training); after step 5 (t=5, 4 s trained) the first evaluation (t=7); after step 8 (t=10, 7 s trained) the
    # second (t=12); 12 >= 10.5: stop. 8 steps, 4 s of evaluations.
    assert tr["steps"] == 8 and tr["first_step_s"] == 1.0 and tr["paused_s"] == 4.0 and tr["end"] == 12.0
    assert [(p["step"], p["train_s"], p["paused_before_s"], p["eval_s"]) for p in tr["points"]] == [
        (5, 4.0, 0.0, 2.0), (8, 7.0, 2.0, 2.0)]
    assert tr["train_s"] == 12.0 - 1.0 - 4.0
    # the schedule's fraction: step k (k >= 2) starts at t=k-1 with k-2 s trained (the schedule starts at t=1)...
    assert fracs[0] == 0.0 and fracs[1:5] == [pytest.approx(k / 9.5) for k in (0, 1, 2, 3)]
    # ...and after the evaluation the span shrinks by its 2 s: the schedule still ends at the deadline
    assert fracs[5:] == [pytest.approx(k / 7.5) for k in (4, 5, 6)]


def test_no_step_starts_after_the_deadline_and_setup_counts():
    clock = FakeClock(100.0)
    calls = []
    tr = tta.train_for_budget(lambda s, f: calls.append(s), clock, 99.0, say=lambda m: None)
    assert tr["steps"] == 0 and calls == [] and tr["points"] == []
    # a slow step is the last one: the deadline is checked before each step
    clock = FakeClock(0.0)

    def slow(step, frac):
        clock.t += 7.0

    assert tta.train_for_budget(slow, clock, 10.0, sync_every=1, say=lambda m: None)["steps"] == 2


def test_a_progress_line_at_least_every_ten_seconds_of_training():
    clock, said = FakeClock(), []

    def do_step(step, frac):
        clock.t += 3.0

    tta.train_for_budget(do_step, clock, 61.0, sync_every=1, say=lambda m: said.append((clock.t, m)))
    times = [0.0] + [t for t, _ in said] + [clock.t]
    assert max(b - a for a, b in zip(times, times[1:])) <= tta.PROGRESS_S + 3.0  # one step past the interval
    assert said[0][1].startswith("first step done")


def test_minutes_to_knn_reads_the_first_point_at_or_above_each_threshold():
    pts = [{"knn_top1": 55.0, "wall_s_excl_curve": 60.0}, {"knn_top1": 81.0, "wall_s_excl_curve": 150.0},
           {"knn_top1": 79.0, "wall_s_excl_curve": 240.0}]
    got = tta.minutes_to(pts, thresholds=(50, 80, 90))
    assert got == {"50": 1.0, "80": 2.5, "90": None}


def test_a_budget_spent_before_training_is_an_error_not_a_zero_step_result(tmp_path, capsys, data_root):
    out = tmp_path / "tta.json"
    rc = tta.main(["--arch", "resnet18", "--width", "8", "--minutes", "0.5", "--eval_reserve_s", "5", "--device",
                   "cpu", "--batch_size", "32", "--train_subset", "256", "--test_subset", "100", "--json", str(out)],
                  t_launch=time.perf_counter() - 29.0)  # launched "29 s ago": 1 s left, 5 s kept for the kNN
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().startswith("error: setup took") and "give more --minutes" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch, data_root):
    import simclr.data

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(simclr.data, "get_dataset", interrupted)
    rc = tta.main(["--minutes", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 130 and err.strip().splitlines() == [err.strip()] and "interrupted (Ctrl-C)" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_tiny_cpu_run_prints_its_phases_and_writes_a_curve(tmp_path, capsys, data_root):
    out = tmp_path / "tta.json"
    rc = tta.main(["--arch", "resnet18", "--width", "8", "--minutes", "0.4", "--eval_reserve_s", "8",
                   "--device", "cpu", "--batch_size", "32", "--train_subset", "256", "--test_subset", "100",
                   "--curve_points", "2", "--json", str(out)], t_launch=time.perf_counter())
    text = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out.read_text())
    for phase in ("loading cifar10", "building resnet18", "training until", "final kNN"):
        assert phase in text
    assert res["steps"] >= 1 and 1 <= len(res["curve"]) <= 2
    final = res["curve"][-1]
    assert final["step"] == res["steps"] and final["knn_top1"] == res["knn_top1"]
    # a percentage of the 100 test images: a whole number of them, as printed
    assert res["knn_top1"] == pytest.approx(round(res["knn_top1"])) and f"kNN top-1 {res['knn_top1']:.2f}%" in text
    assert res["minutes_to_knn"] == tta.minutes_to(res["curve"])
    for p in res["curve"]:
        assert p["wall_s_excl_curve"] == pytest.approx(p["wall_s"] - p["paused_before_s"])
