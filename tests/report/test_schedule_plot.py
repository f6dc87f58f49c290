"""The report's learning-rate figure of a run planned absurdly long (`iters: 2e11` in its config.yaml): drawn at a
bounded number of points, each equal to the schedule's formula, through the real CLI on a real run folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers.folder_runs import cli, one_run as run_folder_of, tiny_data_setup


_DATA: list = []


_setup = tiny_data_setup(_DATA)


def one_run(tmp_path: Path, **over) -> Path:
    return run_folder_of(_DATA[0], tmp_path, **over)


# ------------------------------------------------------------------------------------------------
# (e) `simclr report` of a run whose config.yaml says iters: 2e11 died with a MemoryError
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("iters", ["2.0e+11", "200000000000", ".inf"])
def test_report_of_an_absurd_iters_draws_the_schedule_with_bounded_work(tmp_path, iters):
    import re
    run = one_run(tmp_path, iters=2, save_freq=0)
    cfg = run / "config.yaml"
    cfg.write_text(re.sub(r"(?m)^iters: .*$", f"iters: {iters}", cfg.read_text()))
    rc, out, err = cli("report", run, "--no_pictures", "true")
    assert rc == 0, err
    assert "Traceback" not in err and "MemoryError" not in err
    assert (run / "report.html").is_file() and (run / "report" / "lr.png").is_file()


def test_the_planned_schedule_of_a_long_run_is_drawn_at_bounded_points(tmp_path, monkeypatch):
    """The planned learning rate at the points drawn equals the formula (warmup 10%, then cosine) at those steps."""
    import math
    from simclr.report import plots
    drawn = {}

    def keep(self, x, y=None, *a, **k):
        drawn.setdefault("xy", (np.asarray(x), np.asarray(y)))
        return []
    import matplotlib.axes
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", keep)
    iters, lr = 10 ** 12, 2.0
    plots.plot_lr([], {"iters": iters, "lr": lr, "lr_schedule": "warmup-anneal", "warmup": 0.1}, tmp_path / "lr.png")
    x, y = drawn["xy"]
    assert len(x) == plots.PLANNED_POINTS and x[-1] == iters
    for i in (0, len(x) // 20, len(x) // 2, len(x) - 1):
        s = (x[i] - 1) / iters  # the fraction of the run done before that step
        want = lr * s / 0.1 if s < 0.1 else lr * 0.5 * (1 + math.cos(math.pi * (s - 0.1) / 0.9))
        assert abs(y[i] - want) < 1e-3 * lr, (i, y[i], want)
