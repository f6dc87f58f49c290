"""Report, compare, TensorBoard and the examples on a real (tiny) pretraining run on CIFAR-10."""
from __future__ import annotations

import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from tests.conftest import REPO, run_script

from simclr import report, runs
from simclr.cli import main as cli_main


@pytest.fixture
def real_run(trained_run):
    """A finished 4-step run with a kNN evaluation at the start and at the end, and checkpoints (a copy of
    conftest's session run, under its own logs/ root)."""
    return trained_run


@pytest.fixture
def saved_figures(monkeypatch) -> dict:
    """Every figure the report code saves, by file name stem (what was drawn, besides the PNG)."""
    from simclr.report import pictures, plots
    figures, real = {}, plots.save

    def recording(fig, path, *a, **k):
        figures[Path(path).stem] = fig
        return real(fig, path, *a, **k)

    monkeypatch.setattr(plots, "save", recording)
    monkeypatch.setattr(pictures, "save", recording)
    return figures


def assert_picture(path: Path, min_side: int = 200) -> None:
    """A drawn PNG: at least ``min_side`` pixels each way, and not blank (many colours, and more than a
    sliver of it differs from the background colour)."""
    from PIL import Image
    with Image.open(path) as im:
        assert im.format == "PNG", path
        rgb = im.convert("RGB")
    assert min(rgb.size) >= min_side, (path, rgb.size)
    counts = sorted(rgb.getcolors(maxcolors=rgb.size[0] * rgb.size[1]), reverse=True)
    assert len(counts) > 20, (path, len(counts))
    background = counts[0][0]
    assert 1 - background / (rgb.size[0] * rgb.size[1]) > 0.02, (path, "almost all one colour")


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href"):
                self.refs.append(v)


def _refs(page: Path) -> list:
    p = _Refs()
    p.feed(page.read_text())
    return p.refs


class _StatusText(HTMLParser):
    """The text of the page's status element (id="status"), as a browser shows it."""

    def __init__(self):
        super().__init__()
        self.depth, self.text = 0, ""

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += 1
        elif dict(attrs).get("id") == "status":
            self.depth = 1

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.text += data


def _status(page: Path) -> str:
    p = _StatusText()
    p.feed(page.read_text())
    return p.text.strip()


@pytest.mark.slow  # ~30-70 s on a busy 2-core box (feature extraction, subprocess + CIFAR load)
def test_report_on_a_real_run(real_run, saved_figures):
    run = real_run
    # an evaluation result beside it, in the layout `simclr eval` writes (plus a confusion matrix)
    classes = ["airplane", "automobile", "bird"]
    (run / "eval.json").write_text(json.dumps({
        "protocol": "linear", "top1": 61.0, "top5": 95.0, "classes": classes,
        "per_class": {"airplane": 70.0, "automobile": 65.0, "bird": 48.0},
        "confusion": [[7, 2, 1], [3, 6, 1], [2, 3, 5]], "encoder": {"path": "x.pt", "sha256": "ab" * 32}}))
    (run / "report").mkdir()
    # an earlier report's picture (its PNG mark, listed in its manifest): must not survive
    (run / "report" / "stale.png").write_bytes(b"\x89PNG\r\n\x1a\n tEXtSoftware\0simclr report")
    (run / "report" / "manifest.json").write_text(json.dumps({"files": ["stale.png"]}))
    page = report.write_report(run, gallery=100, n_embed=100, n_queries=4)
    assert page == run / "report.html"
    want = {"curves", "lr", "accuracy", "speed", "views", "retrieval", "embedding", "confusion"}
    assert {p.stem for p in (run / "report").glob("*.png")} == want
    refs = _refs(page)
    assert {Path(r).stem for r in refs} == want
    for r in refs:  # every picture the page shows exists, relative to the page (no server, no absolute paths)
        assert not Path(r).is_absolute() and (page.parent / r).is_file()
        assert_picture(page.parent / r)
    # the curves are the run's own records
    train = [m for m in runs.read_metrics(run) if "loss" in m]
    (loss,) = saved_figures["curves"].axes[0].lines
    assert list(loss.get_xdata()) == [m["step"] for m in train] and len(train) == 4
    assert list(loss.get_ydata()) == pytest.approx([m["loss"] for m in train])
    knn = [m for m in runs.read_metrics(run) if "knn_top1" in m]
    assert [m["step"] for m in knn] == [0, 4]  # at the start and at the end
    assert list(saved_figures["accuracy"].axes[0].lines[0].get_ydata()) == pytest.approx([m["knn_top1"] for m in knn])
    text = page.read_text()
    assert _status(page) == "finished"  # the rendered status, not the CSS class `.finished` in the style sheet
    assert "61.00" in text and "skipped" not in text


@pytest.mark.slow  # ~25 s: feature extraction twice
def test_report_reads_images_where_the_run_did(real_run, tmp_path, monkeypatch):
    """No DATA_ROOT: the pictures come from the data root recorded in env.json, passed down explicitly;
    the process environment is left as it was."""
    run = real_run
    monkeypatch.delenv("DATA_ROOT")
    monkeypatch.chdir(tmp_path)  # ./data does not exist here
    report.write_report(run, gallery=50, n_embed=50, n_queries=2)
    assert {"views", "retrieval", "embedding"} <= {p.stem for p in (run / "report").glob("*.png")}
    assert "DATA_ROOT" not in os.environ
    # an explicit data root wins over the recorded one (which would not be found)
    env = json.loads((run / "env.json").read_text())
    (run / "env.json").write_text(json.dumps(dict(env, data_root=str(tmp_path / "nowhere"))))
    page = report.write_report(run, pictures=True, gallery=50, n_embed=50,
                               data_root=env["data_root"])
    assert "views.png" in page.read_text() and "skipped" not in page.read_text()
    n = len([d for d in (Path(env["data_root"]) / "cifar10" / "test").iterdir() if d.is_dir()])
    assert f"{n} of {n} classes" in page.read_text()  # by default the retrieval grid asks every class
    assert "DATA_ROOT" not in os.environ


def test_report_degrades_to_notes_when_inputs_are_missing(tmp_path, capsys):
    run = tmp_path / "logs" / "x" / "r1"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"status": "failed", "error": "DataError: no data"}))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "lr": 0.1, "images_per_s": 10, "data_time_fr')
    assert cli_main(["report", str(run)]) == 0
    page = run / "report.html"
    assert _refs(page) == [] and "no training records" in page.read_text() and "no readable config" in page.read_text()
    assert _status(page) == "failed"
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert "run folder not found" in capsys.readouterr().err


def test_report_page_shows_status_and_escapes_run_values(tmp_path, capsys):
    """Values from a run folder are text on the page (autoescaped template), and the status is rendered."""
    run = tmp_path / "logs" / "x" / "r2"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"status": "interrupted", "started": 1.0, "updated": 2.0}))
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "<script>alert(1)</script>", "lr": 0.5}))
    assert cli_main(["report", str(run), "--no_pictures"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run / 'report.html'}"
    text = (run / "report.html").read_text()
    assert _status(run / "report.html") == "interrupted"
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "skipped (--no_pictures)" in text


def test_eval_figure_is_named_and_captioned_for_what_it_draws(tmp_path):
    """A confusion matrix is drawn as one (confusion.png, rows = true classes); an eval.json with per-class
    accuracy only gets per_class.png and a caption that says so, never a confusion-matrix caption."""
    from simclr.report import plots
    run = tmp_path / "logs" / "x" / "r"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"status": "finished", "started": 1.0, "updated": 2.0}))
    cm = [[8, 2, 0], [1, 9, 0], [0, 5, 5]]
    (run / "eval.json").write_text(json.dumps({"protocol": "linear", "top1": 73.3, "classes": ["a", "b", "c"],
                                               "per_class": {"a": 80.0, "b": 90.0, "c": 50.0}, "confusion": cm}))
    page = report.write_report(run, pictures=False)
    assert {p.stem for p in (run / "report").glob("*.png")} >= {"confusion"}
    assert "Confusion matrix from eval.json: rows are true classes" in page.read_text()
    ax = plots.eval_figure({"confusion": cm, "classes": ["a", "b", "c"]}).axes[0]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true"
    # what is drawn is the row-normalised counts
    assert ax.images[0].get_array().tolist() == [[80.0, 20.0, 0.0], [10.0, 90.0, 0.0], [0.0, 50.0, 50.0]]
    (run / "eval.json").write_text(json.dumps({"protocol": "linear", "top1": 73.3,
                                               "per_class": {"a": 80.0, "b": 90.0, "c": 50.0}}))
    text = report.write_report(run, pictures=False).read_text()
    assert {p.stem for p in (run / "report").glob("*.png")} >= {"per_class"}
    assert not (run / "report" / "confusion.png").exists() and "Confusion matrix" not in text
    assert "Per-class top-1 accuracy from eval.json, which holds no confusion matrix" in text


def test_report_shows_the_evaluations_of_the_runs_checkpoints(tmp_path, capsys):
    """Results of eval runs elsewhere under the runs root are the run's results too, as in `simclr runs`:
    linked by checkpoint path or by checksum; an eval of another run's checkpoint is not shown."""
    root = tmp_path / "logs"
    run = root / "exp" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"status": "finished", "started": 1.0, "updated": 2.0}))
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "exp", "iters": 10, "lr": 0.5}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 5, "epoch": 1.0, "loss": 5.0}, {"step": 10, "epoch": 2.0, "knn_top1": 30.0, "knn_top5": 70.0})))
    (run / "checkpoints" / "checkpoint-00000010.json").write_text(json.dumps({"sha256": "feed"}))

    def eval_run(name, ev):
        folder = root / "lin" / name
        folder.mkdir(parents=True)
        (folder / "status.json").write_text(json.dumps({"status": "finished", "started": 3.0, "updated": 4.0}))
        (folder / "eval.json").write_text(json.dumps(ev))

    eval_run("by-path", {"protocol": "linear", "top1": 55.5, "top5": 90.0, "classes": ["a", "b"],
                         "confusion": [[9, 1], [3, 7]],
                         "encoder": {"path": str(run / "checkpoints" / "checkpoint-00000010.pt")}})
    eval_run("by-sha", {"protocol": "knn", "top1": 41.0, "top5": 80.0,
                        "encoder": {"path": "/moved/away.pt", "sha256": "feed"}})
    eval_run("other", {"protocol": "linear", "top1": 99.0, "encoder": {"path": "/x/checkpoints/c.pt"}})
    assert cli_main(["report", str(run), "--root", str(root), "--no_pictures"]) == 0
    text = (run / "report.html").read_text()
    assert "<th>linear top-1</th><td>55.50</td>" in text  # the same number `simclr runs` shows
    assert "lin/by-path/eval.json" in text and "lin/by-sha/eval.json" in text and "lin/other" not in text
    assert "99.00" not in text
    assert (run / "report" / "confusion0.png").is_file() and (run / "report" / "accuracy.png").is_file()
    # without the runs root the run's own folder is all there is
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["report", str(run), "--root", str(empty), "--no_pictures"]) == 0
    text = (run / "report.html").read_text()
    assert "<th>linear top-1</th><td>-</td>" in text and "lin/by-path" not in text


def test_accuracy_is_plotted_against_the_step_like_every_other_figure():
    from simclr.report import plots
    recs = [{"step": s, "epoch": s / 8, "loss": 5.0} for s in (4, 8, 16)]
    recs += [{"step": s, "epoch": s / 8, "knn_top1": acc, "knn_top5": acc + 30} for s, acc in ((0, 10.0), (16, 30.0))]
    fig = plots.accuracy_figure(recs, [{"protocol": "linear", "top1": 42.0}], total_steps=20)
    a = fig.axes[0]
    assert a.get_xlabel() == "step"
    assert list(a.lines[0].get_xdata()) == [0, 16] and list(a.lines[0].get_ydata()) == [10.0, 30.0]
    assert list(a.lines[2].get_xdata()) == [16]  # the evaluation result at the last step, not an epoch
    (epoch_axis,) = a.child_axes  # epochs on the top axis, 8 steps each
    fig.canvas.draw()
    assert epoch_axis.get_xlabel() == "epoch"
    assert epoch_axis.get_xlim() == pytest.approx(tuple(x / 8 for x in a.get_xlim()))


def test_config_diff_lists_exactly_the_differing_keys():
    a = {"lr": 1.0, "temperature": 0.5, "arch": "resnet18", "seed": 0}
    b = {"lr": 0.5, "temperature": 0.5, "arch": "resnet18", "seed": 0, "extra": 1}
    c = {"lr": 1.0, "temperature": 0.2, "arch": "resnet18", "seed": 0}
    assert report.config_diff([a, b]) == {"lr": [1.0, 0.5], "extra": ["<missing>", 1]}
    assert set(report.config_diff([a, b, c])) == {"lr", "temperature", "extra"}
    assert report.config_diff([a, dict(a)]) == {}


def test_compare_command(real_run, tmp_path, capsys, monkeypatch, saved_figures):
    other = tmp_path / "logs" / "t" / "other"
    shutil.copytree(real_run, other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg.update(temperature=0.2, lr=0.25)
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "cmp.png"
    assert cli_main(["compare", str(real_run), str(other), "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["differences"]) == {"temperature", "lr"}
    assert res["differences"]["temperature"] == [0.5, 0.2]
    assert_picture(out)
    # each run's loss curve is drawn from its own metrics.jsonl (the copy has the same records)
    loss_panel = saved_figures["cmp"].axes[0]
    want = [m["loss"] for m in runs.read_metrics(real_run) if "loss" in m]
    assert [list(line.get_ydata()) for line in loss_panel.lines] == [pytest.approx(want)] * 2
    assert [line.get_label() for line in loss_panel.lines] == [
        f"t/{real_run.name} (lr=0.5, temperature=0.5)", "t/other (lr=0.25, temperature=0.2)"]
    assert cli_main(["compare", str(real_run), str(other), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "temperature" in table and "lr" in table and "arch" not in table
    assert cli_main(["compare", str(real_run)]) == 2
    # without --out: inside the first run's folder (never ./compare.png of whatever folder we are in), path printed
    first = tmp_path / "logs" / "t" / "first"
    shutil.copytree(real_run, first)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert cli_main(["compare", str(first), str(other)]) == 0
    assert f"figure: {first / 'compare.png'}" in capsys.readouterr().out
    assert list(cwd.iterdir()) == []
    assert_picture(first / "compare.png")


def test_tensorboard_reads_the_runs_folder(real_run):
    """What `tensorboard --logdir logs` does: discover every run's tb/ folder and load its scalars."""
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    root = real_run.parent.parent
    mux = EventMultiplexer().AddRunsFromDirectory(str(root))
    mux.Reload()
    rel = f"{real_run.parent.name}/{real_run.name}/tb"
    assert rel in mux.Runs()
    tags = mux.Runs()[rel]["tensors"] or mux.Runs()[rel]["scalars"]
    assert {"loss", "contrast_acc", "lr", "knn_top1"} <= set(tags)
    recs = [r for r in runs.read_metrics(real_run) if "loss" in r]
    got = mux.Tensors(rel, "loss") if mux.Runs()[rel]["tensors"] else mux.Scalars(rel, "loss")
    assert [e.step for e in got] == [r["step"] for r in recs]


def _example(name, *args):
    return run_script(REPO / "examples" / name, *args)


def test_example_read_runs(real_run, tmp_path):
    out = tmp_path / "runs.png"
    r = _example("read_runs.py", "--root", real_run.parent.parent, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "1 runs under" in r.stdout and "finished" in r.stdout and out.is_file()


def test_example_apply_model(real_run):
    r = _example("apply_model.py", real_run, "--gallery", 100, "--queries", 30)
    assert r.returncode == 0, r.stderr
    assert "nearest training images" in r.stdout and "1-nearest-neighbour accuracy on 30 test images" in r.stdout
