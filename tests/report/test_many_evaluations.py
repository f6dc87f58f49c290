"""The report with many evaluations: a readable accuracy panel, comparable numbers apart from the rest, a table
with the data sizes, one confusion matrix in full, the kNN note, and every invocation."""
from __future__ import annotations

import json
import re

import yaml

from simclr.report import plots
from simclr.report.page import write_report
from simclr.rundir import RunDir

CM = [[8, 2], [3, 7]]


def _records():
    recs = [{"step": s, "epoch": s / 10, "loss": 5.0 - s / 100} for s in (10, 20, 30)]
    return recs + [{"step": s, "epoch": s / 10, "knn_top1": a, "knn_top5": a + 30} for s, a in ((0, 10.0), (30, 30.0))]


def _ev(top1, protocol="linear", data="cifar10", train_size=0, n_train=1000, **extra):
    return dict({"protocol": protocol, "top1": top1, "top5": top1 + 40, "n_train": n_train, "n_test": 500,
                 "classes": ["a", "b"], "confusion": CM,
                 "data": {"name": data, "train_size": train_size}, "details": {}}, **extra)


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_ten_evaluations_leave_the_plot_uncovered():
    fig = plots.accuracy_figure(_records(), [_ev(30.0 + i) for i in range(10)], total_steps=30, run_data="cifar10")
    fig.tight_layout()
    fig.canvas.draw()
    a = fig.axes[0]
    r = fig.canvas.get_renderer()
    legend = a.get_legend()
    assert len(legend.get_texts()) == 12  # kNN top-1, top-5 and the ten results
    assert not _overlap(legend.get_window_extent(r), a.get_window_extent(r))


def test_transfer_label_fraction_and_finetune_are_not_on_the_same_axis():
    evals = [_ev(40.0), _ev(41.0, protocol="knn"), _ev(55.0, data="stl10"), _ev(35.0, train_size=500),
             _ev(60.0, protocol="linear+finetune", details={"finetune": True})]
    fig = plots.accuracy_figure(_records(), evals, total_steps=30, run_data="cifar10")
    main, other = fig.axes[0], fig.axes[1]
    stars = [ln for ln in main.lines if ln.get_marker() == "*"]
    assert sorted(float(ln.get_ydata()[0]) for ln in stars) == [40.0, 41.0]
    labels = [t.get_text() for t in other.get_yticklabels()]
    assert labels == ["linear (transfer to stl10)", "linear (500 labels)", "linear+finetune (fine-tuned)"]
    assert sorted(p.get_width() for p in other.patches) == [35.0, 55.0, 60.0]


def _run(tmp_path, evals):
    run = tmp_path / "logs" / "demo" / "r1"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"status": "finished", "started": 1.0, "updated": 2.0}))
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "demo", "data": "cifar10", "iters": 30, "lr": 0.5,
                                                     "train_subset": 512, "test_subset": 200, "knn_k": 200,
                                                     "knn_t": 0.1}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    for i, ev in enumerate(evals):
        (run / f"eval-{i:02d}.json").write_text(json.dumps(ev))
    return run


def test_the_page_with_ten_evaluations(tmp_path):
    evals = [_ev(30.0 + i) for i in range(9)] + [_ev(33.5, protocol="knn", details={"k": 200, "temperature": 0.1})]
    run = _run(tmp_path, evals)
    rd = RunDir(run)
    rd.record_environment({"command": "simclr pretrain --config configs/demo.yaml", "host": "a", "device": "cpu"})
    rd.record_environment({"command": "simclr pretrain --resume logs/demo/r1", "host": "b", "device": "cuda"})
    rd.close()
    text = (write_report(run, pictures=False, runs_root=None)).read_text()
    # the evaluation table names the dataset and the image counts
    assert re.search(r"<th>dataset</th><th>labelled train images</th><th>test images</th>", text)
    assert "<td>linear</td><td>cifar10</td><td>1000</td><td>500</td><td>38.00%</td>" in text
    # one confusion matrix in full (the best result), the nine others collapsed in one details element
    before, details = text.split("<details><summary>9 more evaluations", 1)
    assert before.count("Confusion matrix from") == 1 and "eval-08.json" in before.split("<h2>Accuracy")[1]
    assert details.split("</details>")[0].count("Confusion matrix from") == 9
    # the two kNN numbers explained
    assert "a gallery of 512 training images, k 200" in text and "(1000 images here, k 200" in text
    # every invocation, not only the last
    assert "simclr pretrain --config configs/demo.yaml" in text and "simclr pretrain --resume logs/demo/r1" in text


def test_every_invocation_is_recorded(tmp_path):
    rd = RunDir(tmp_path / "r")
    for cmd in ("first", "second"):
        rd.record_environment({"command": cmd})
    rd.close()
    lines = [json.loads(x) for x in (tmp_path / "r" / "invocations.jsonl").read_text().splitlines()]
    assert [x["command"] for x in lines] == ["first", "second"]
    assert json.loads((tmp_path / "r" / "env.json").read_text())["command"] == "second"


def test_results_on_another_number_of_test_images_are_not_stars_and_stars_stand_apart():
    """The demo's monitor tests on 2,000 images; a `simclr knn` on all 10,000 measures another set."""
    evals = [_ev(40.0, config={"test_subset": 2000}), _ev(41.0, protocol="knn", config={"test_subset": 2000}),
             dict(_ev(42.0, protocol="knn", config={"test_subset": 0}), n_test=10000)]
    fig = plots.accuracy_figure(_records(), evals, total_steps=30, run_data="cifar10", run_tests=2000)
    main, other = fig.axes[0], fig.axes[1]
    stars = [ln for ln in main.lines if ln.get_marker() == "*"]
    assert sorted(float(ln.get_ydata()[0]) for ln in stars) == [40.0, 41.0]
    assert len({float(ln.get_xdata()[0]) for ln in stars}) == 2  # side by side, not one on the other
    assert [t.get_text() for t in other.get_yticklabels()] == ["knn (10000 test images)"]


def test_the_knn_note_of_a_majority_vote_names_the_vote_not_a_missing_temperature():
    from simclr.report.page import _knn_note
    note = _knn_note({"train_subset": 5000, "test_subset": 2000, "knn_k": 200, "knn_t": 0.1},
                     [_ev(36.9, protocol="knn", details={"k": 20, "vote": "majority"})])
    assert "majority vote" in note and "temperature -" not in note and "k 20" in note
