"""``report.html`` of one run folder: the figures and pictures, assembled from a Jinja2 template.

``write_report(RUN_DIR)`` writes ``RUN_DIR/report.html`` with its pictures in ``RUN_DIR/report/``
(plain PNGs beside the page: it opens from the file system, no server). The page is
``templates/report.html.j2``, rendered with autoescape on, so every value from a run folder is shown
as text. Every section whose inputs are missing (no metrics yet, no checkpoint, data not found) is
replaced by a one-line note instead of failing the whole report.
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Optional

from ..errors import DataError, UserError
from ..files import atomic_write, claim_output, replace_outputs, written_by
from ..progress import ALWAYS, rate
from ..runs import read_config, read_json, read_metrics, with_links
from ..runs.evals import encoder_sha
from . import plots
from .pictures import Datasets, load_run_encoder, plot_retrieval_and_embedding, plot_views

log = logging.getLogger(__name__)

PICTURES = "report"  # sub-folder of the output folder holding the PNGs (and manifest.json: which are ours)
HTML_MARK = '<meta name="generator" content="simclr report">'  # in every report.html we write
TEMPLATE = "report.html.j2"


def _fmt(v, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def render(**context) -> str:
    """The page's HTML from the packaged template (a missing variable is an error, not an empty cell)."""
    import jinja2
    env = jinja2.Environment(loader=jinja2.PackageLoader("simclr.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(TEMPLATE).render(**context)


class _Figures:
    """The page's figure list: (title, picture path relative to the page, caption) or (title, None, note)."""

    def __init__(self):
        self.items: list = []
        self.folded: list = []

    def add(self, title: str, produced, caption, missing, folded: bool = False) -> None:
        """``folded``: one of several near-identical sections, shown collapsed at the end of the page."""
        if produced is not None and Path(produced).exists():
            item = {"title": title, "src": f"{PICTURES}/{Path(produced).name}", "text": caption}
        else:
            item = {"title": title, "src": None, "text": missing}
        (self.folded if folded else self.items).append(item)


def _plots(figs: _Figures, records: list, evals: list, cfg: dict, pic_dir: Path, is_eval: bool) -> None:
    loss_name = "training loss of the head" if is_eval else "NT-Xent loss"
    figs.add("Loss and contrastive accuracy", plots.plot_curves(records, pic_dir / "curves.png", loss_name),
             "NT-Xent loss and the fraction of anchors whose positive scores highest among all 2N-1 candidates, "
             "at each logged step.", "no training records in metrics.jsonl yet")
    figs.add("Learning-rate schedule", plots.plot_lr(records, cfg, pic_dir / "lr.png"),
             "Grey: the schedule computed from the config for every step; dots: the values logged by the run.",
             "no learning rate in config.yaml or metrics.jsonl")
    iters = cfg.get("iters")  # a hand-edited config.yaml may say anything: only a finite step count is drawn
    total_steps = iters if isinstance(iters, (int, float)) and 0 < iters < math.inf else None
    run_data = str(cfg.get("data") or "")
    run_tests = cfg.get("test_subset") if isinstance(cfg.get("test_subset"), int) else None
    figs.add("Accuracy", plots.plot_accuracy(records, evals, pic_dir / "accuracy.png", total_steps, run_data,
                                             run_tests),
             "Weighted kNN on the frozen representation (train split -> test split) at each evaluation, against "
             "the optimizer step like every other figure (epochs on the top axis); "
             "stars: results of evaluation runs of this run's checkpoints (their eval.json) on the same dataset "
             "and test images with all its labels; results of other settings (another dataset, another number of "
             "test images, a label fraction, fine-tuning) are in a panel of their own, as they measure something "
             "else." + _knn_note(cfg, evals),
             "no kNN evaluation in metrics.jsonl and no eval.json")
    figs.add("Throughput and data wait", plots.plot_speed(records, pic_dir / "speed.png"),
             "Images per second over each logging interval, and the share of that interval the loop waited for "
             "the next batch (high values: the input pipeline is the bottleneck).",
             "no throughput records in metrics.jsonl")


def _knn_note(cfg: dict, evals: list) -> str:
    """Why the curve's kNN and a `simclr knn` result differ: each votes over its own gallery with its own k."""
    knn = [ev for ev in evals if str(ev.get("protocol", "")).startswith("knn")]
    if not knn or not cfg:
        return ""
    gallery = f"{cfg['train_subset']}" if cfg.get("train_subset") else "all the"
    tests = f"{cfg['test_subset']}" if cfg.get("test_subset") else "all the"
    ev = knn[-1]
    d = ev.get("details") if isinstance(ev.get("details"), dict) else {}
    vote = (f"temperature {d['temperature']}" if "temperature" in d else
            f"{d['vote']} vote" if d.get("vote") else "its own vote")
    return (f" The curve is the pretraining monitor's kNN: a gallery of {gallery} training images, k "
            f"{cfg.get('knn_k', 200)}, temperature {cfg.get('knn_t', 0.1)}, on {tests} test images; a kNN "
            f"evaluation votes over its own labelled set ({ev.get('n_train', '?')} images here, k {d.get('k', '-')}, "
            f"{vote}, {ev.get('n_test', '?')} test images), so the two numbers can differ by design.")


def _pictures(figs: _Figures, run: Path, cfg: dict, pic_dir: Path, datasets: Datasets, n_queries: int,
              gallery: int, n_embed: int, device: str) -> None:
    try:
        p, cap = plot_views(cfg, pic_dir / "views.png", datasets=datasets)
        figs.add("What the network sees: augmented views", p, cap, "")
    except (DataError, UserError, OSError) as e:
        figs.add("What the network sees: augmented views", None, None, f"skipped: {e}")
    encoder, src = load_run_encoder(run, cfg)
    if encoder is None:
        figs.add("Nearest-neighbour retrieval", None, None, "skipped: no loadable encoder checkpoint in this run")
        return
    big = (encoder.input_size or 32) > 64
    gallery, n_embed = gallery or (300 if big else 1000), n_embed or (300 if big else 500)
    log.info(f"report: embedding {gallery} training and {n_embed} test images with {src.name} (retrieval, "
             f"embedding)", extra=ALWAYS)
    try:
        res = plot_retrieval_and_embedding(encoder, cfg, pic_dir, n_queries=n_queries, gallery=gallery,
                                           n_embed=n_embed, device=device, datasets=datasets)
        figs.add("Nearest-neighbour retrieval", res["retrieval"][0], res["retrieval"][1] + f" Encoder: {src.name}.",
                 "")
        figs.add("Embedding", res["embedding"][0], res["embedding"][1], "")
    except (DataError, UserError, OSError) as e:
        figs.add("Nearest-neighbour retrieval", None, None, f"skipped: {e}")


# the names the report draws its pictures under (a user's other files in report/ are never touched)
PICTURE_NAMES = re.compile(r"^(curves|lr|accuracy|speed|views|retrieval|embedding|(confusion|per_class)\d*)\.png\Z")


def _eval_figure(figs: _Figures, ev: dict, pic_dir: Path, i: Optional[int], folded: bool = False) -> None:
    """The confusion matrix of one evaluation, and/or its per-class accuracy; named and captioned for
    what is drawn (an eval.json of an older version holds per-class accuracy only)."""
    src = ev.get("_source") or ev.get("_file")
    has_cm = plots.confusion_matrix(ev) is not None
    has_per = isinstance(ev.get("per_class"), dict) and bool(ev["per_class"])
    stem = "confusion" if has_cm else "per_class"
    produced = plots.plot_eval(ev, pic_dir / f"{stem}{'' if i is None else i}.png")
    if has_cm:
        caption = (f"Confusion matrix from {src}: rows are true classes, columns the predicted ones, each row "
                   f"normalised to 100% (the diagonal is each class's accuracy)"
                   + ("; right: per-class top-1 accuracy." if has_per else "."))
    else:
        caption = f"Per-class top-1 accuracy from {src}, which holds no confusion matrix (an older evaluation)."
    figs.add(f"Evaluation: {ev.get('protocol', 'eval')} ({src})", produced, caption,
             f"{src} holds no confusion matrix or per-class accuracy", folded)


def _best(evals: list) -> int:
    """Index of the evaluation shown in full: the best top-1 (the last of equals); -1 for none."""
    scored = [(ev.get("top1") if isinstance(ev.get("top1"), (int, float)) else -1.0, i) for i, ev in enumerate(evals)]
    return max(scored)[1] if scored else -1


EVAL_HEAD = ("result", "dataset", "labelled train images", "test images", "top-1", "top-5", "from")


def _eval_rows(evals: list, run_data: str) -> list:
    """One row per evaluation: what it is (and the setting, when not the run's own data with all labels), on which
    dataset and how many images, its accuracy and where it comes from."""
    rows = []
    for ev in evals:
        data = ev.get("data") if isinstance(ev.get("data"), dict) else {}
        setting = plots.eval_setting(ev, run_data)
        sha = encoder_sha(ev)
        rows.append((f"{ev.get('protocol', 'eval')}" + (f" ({setting})" if setting else ""),
                     data.get("name") or run_data or "-", _fmt(ev.get("n_train")), _fmt(ev.get("n_test")),
                     f"{_fmt(ev.get('top1'))}%", f"{_fmt(ev.get('top5'))}%",
                     ev["_source"] + (f", encoder sha256 {sha[:12]}" if sha else "")))
    return rows


INVOCATION_HEAD = ("when", "command", "host", "device", "git commit")


def _invocations(run: Path, env: dict) -> list:
    """Every command that wrote into the run folder (invocations.jsonl), oldest first; an older run folder has
    only env.json, its last one."""
    lines = read_metrics(run / "invocations.jsonl") if (run / "invocations.jsonl").exists() else []
    lines = [x for x in lines if isinstance(x, dict)] or ([env] if env else [])
    return [(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(x["time"])) if isinstance(x.get("time"), (int, float))
             else "-", x.get("command", "-"), x.get("host", "-"), x.get("device", "-"),
             str(x.get("git_commit") or "-")[:12]) for x in lines]


def _facts(run: Path, row: dict) -> list:
    status = row["status"]
    speed = rate(row["images_per_s"]) if isinstance(row.get("images_per_s"), (int, float)) else "-"
    return [("run", str(run)), ("status", status + (f" ({row['error']})" if row.get("error") else "")),
            ("steps", f"{_fmt(row.get('step'))} / {_fmt(row.get('iters'))}"),
            ("last loss", _fmt(row.get("loss"), 4)), ("kNN top-1 (best)", _fmt(row.get("knn"))),
            ("kNN top-1 at random init", _fmt(row.get("knn_init"))),
            ("linear top-1", _fmt(row.get("linear"))), ("images/s (median, recent)", speed),
            ("started", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["started"])) if row.get("started")
             else "-"),
            ("duration", time.strftime("%H:%M:%S", time.gmtime(row["duration"])) if row.get("duration") else "-")]


def write_report(run_dir, out: Optional[Path] = None, pictures: bool = True, n_queries: int = 0,
                 gallery: int = 0, n_embed: int = 0, device: str = "cpu",
                 data_root: Optional[str] = None, runs_root: Optional[str] = None, force: bool = False) -> Path:
    """Write ``report.html`` (+ PNGs in ``report/``) for a run folder; returns the HTML path.

    ``pictures=False`` skips the sections that need the dataset (views, retrieval, embedding).
    ``data_root``: where the run's images are (default: ``DATA_ROOT`` when set, else the folder the run
    itself read them from, as recorded in its env.json). ``runs_root``: the folder of runs searched for
    evaluation runs of this run's checkpoints, whose results the page shows beside the run's own (as
    ``simclr runs`` links them); None: only the ``eval*.json`` inside the run folder.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    out = Path(out) if out else run
    pic_dir = out / PICTURES
    if pic_dir.is_symlink():  # the pictures (and the removal of stale ones) would land in the link's target
        raise UserError(f"{pic_dir} is a symbolic link (to {os.readlink(pic_dir)}), not a folder; the report "
                        f"writes its pictures only into a real folder: remove the link, or pass --out DIR")
    try:
        pic_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the report into {out}: {e.strerror}; pass --out DIR") from None
    page = out / "report.html"
    claim_output(page, HTML_MARK.encode(), "report", force)
    foreign = sorted(p.name for p in pic_dir.iterdir() if PICTURE_NAMES.match(p.name)
                     and not written_by(p, plots.PNG_MARK.encode()))
    if foreign and not force:  # the report's pictures have fixed names: it would write over these
        raise UserError(f"{pic_dir} holds pictures simclr report did not write ({foreign[0]}"
                        f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); the report would overwrite "
                        f"them. Choose another --out, or pass --force true to overwrite them")

    t0 = time.perf_counter()
    cfg, records = read_config(run), read_metrics(run)
    row, evals = with_links(run, runs_root)
    for ev in evals:  # where each result comes from, as the page names it: eval.json, or lin/<run-id>/eval.json
        other = Path(ev["_run"]) if "_run" in ev else None
        ev["_source"] = f"{other.parent.name}/{other.name}/{ev['_file']}" if other else ev["_file"]
    env = read_json(run / "env.json") or {}
    if not data_root and not os.environ.get("DATA_ROOT"):
        data_root = env.get("data_root") or None  # the pictures need the run's images: read them where it did
    figs = _Figures()
    _plots(figs, records, evals, cfg, pic_dir, row["kind"] != "pretrain")
    if pictures and cfg:
        _pictures(figs, run, cfg, pic_dir, Datasets(cfg, data_root), n_queries, gallery, n_embed, device)
    elif not cfg:
        figs.add("Pictures", None, None, "skipped: the run has no readable config.yaml")
    else:
        figs.add("Pictures", None, None, "augmented views, retrieval and embedding skipped (--no_pictures)")
    shown = _best(evals)  # one evaluation in full; the others (often near-identical) collapsed
    for i, ev in enumerate(evals):
        _eval_figure(figs, ev, pic_dir, i if len(evals) > 1 else None, folded=i != shown)

    env_rows = [(k, env[k]) for k in ("device", "gpu", "host", "torch", "torchvision", "python", "git_commit",
                                      "git_dirty", "command", "cwd") if env.get(k)]
    html = render(name=row["name"], run_id=row["id"], status=row["status"], facts=_facts(run, row),
                  eval_head=EVAL_HEAD, eval_rows=_eval_rows(evals, str(cfg.get("data") or "")), figures=figs.items,
                  folded=figs.folded, config=sorted(cfg.items()), env=env_rows,
                  invocations=_invocations(run, env), invocation_head=INVOCATION_HEAD,
                  written=time.strftime("%Y-%m-%d %H:%M:%S"), seconds=f"{time.perf_counter() - t0:.1f}")
    atomic_write(page, html)
    # last, so a report that fails leaves the previous one whole: remove the earlier report's pictures that this
    # one did not draw again (only those its manifest lists: nothing else in the folder is ours to delete)
    replace_outputs(pic_dir, [Path(f["src"]).name for f in figs.items if f["src"]], plots.PNG_MARK.encode())
    return page
