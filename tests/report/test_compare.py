"""`simclr compare`: runs labelled by what matters, bookkeeping keys never a difference, one unit for data wait."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from simclr.cli import main as cli_main
from simclr.report import plots


def _run(base_dir: Path, rid: str, **cfg) -> Path:
    run = base_dir / "logs" / "t" / rid
    run.mkdir(parents=True)
    base = dict(arch="resnet18", batch_size=256, device="cpu", eval_at_start=True, iters=100, lr=1.0,
                name="t", resume="", root=str(base_dir / "logs"), temperature=0.5, width=64, workers=0)
    base.update(cfg)
    (run / "config.yaml").write_text(yaml.safe_dump(base))
    lines = [{"step": s, "loss": 5.0 - s / 100, "contrast_acc": 0.1, "lr": 0.1, "images_per_s": 100.0,
              "data_time_frac": 0.25} for s in (10, 20, 30)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def test_the_keys_that_matter_come_first_and_bookkeeping_never_counts(tmp_path, capsys):
    a = _run(tmp_path, "a")
    # alphabetically batch_size, device, eval_at_start, resume would come before iters/lr/temperature
    b = _run(tmp_path, "b", batch_size=128, device="cuda", eval_at_start=False, resume=str(a), iters=200, lr=0.5,
             temperature=0.2, name="u", root="elsewhere")
    assert cli_main(["compare", str(a), str(b), "--out", str(tmp_path / "c.png"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert list(res["differences"]) == ["iters", "lr", "temperature", "batch_size"]
    assert set(res["bookkeeping"]) == {"device", "eval_at_start", "resume", "name", "root"}
    configs = [plots.read_config(r) for r in (a, b)]
    labels = plots.run_labels([a, b], configs, plots.config_diff(configs))
    assert labels == ["t/a (iters=100, lr=1.0, temperature=0.5)", "t/b (iters=200, lr=0.5, temperature=0.2)"]


def test_a_resumed_run_is_not_a_config_difference(tmp_path, capsys):
    a = _run(tmp_path, "a")
    b = _run(tmp_path, "b", resume="auto")
    assert cli_main(["compare", str(a), str(b), "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "the configs are identical" in out
    assert "not counted" in out and "resume" in out.splitlines()[1]


def test_data_wait_is_a_percentage_as_in_the_report(tmp_path):
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b", lr=0.5)
    seen = {}
    real = plots.save

    def keep(fig, path, tight=True):
        for ax in fig.axes:
            seen[ax.get_ylabel()] = [list(line.get_ydata()) for line in ax.lines]
        return real(fig, path, tight)

    plots.save, saved = keep, plots.save
    try:
        plots.compare([a, b], tmp_path / "c.png")
    finally:
        plots.save = saved
    (label,) = [k for k in seen if k.startswith("data wait")]
    assert "%" in label
    assert seen[label][0] == [25.0, 25.0, 25.0]  # 0.25 of the step time, shown as 25 %
