"""The report's figures: matplotlib on an Agg canvas, each written atomically as a PNG.

    curves.png      loss and contrastive accuracy vs step
    lr.png          the planned learning-rate schedule and the logged values
    accuracy.png    kNN top-1/top-5 vs step, epochs on a second axis (+ evaluation results)
    speed.png       images/s and the share of step time spent waiting for data (%)
    confusion.png   confusion matrix / per-class accuracy from eval.json, when present
    compare.png     several runs on shared axes (``simclr compare``)

Figures are drawn with matplotlib's object API on an Agg canvas, so importing this module never
changes the caller's matplotlib backend (a notebook keeps its own). Every function takes the
records it draws (from :func:`simclr.runs.read_metrics`) and returns the path it wrote, or None
when there was nothing to draw.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..config import with_role
from ..eval_options import EvalConfig
from ..files import atomic_write
from ..options import PretrainConfig
from ..progress import rate
from ..runs import read_config, read_metrics

DPI = 110


def figure(w: float, h: float, rows: int = 1, cols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


PNG_MARK = "simclr report"  # in every PNG we write (its Software field): how a command knows a picture is its own


def save(fig, path: Path, tight: bool = True) -> Path:
    """Write ``fig`` as a PNG at ``path``; a reader never sees half a picture. Every text is drawn as plain text:
    class names, run names and config values come from users (a class folder ``$\\foo$`` is no mathtext)."""
    from matplotlib.text import Text
    for text in fig.findobj(Text):
        text.set_parse_math(False)
    if tight:
        fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI, metadata={"Software": PNG_MARK}))
    return path


def _series(records: list, key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    pts = [(r[x], r[key]) for r in records
           if isinstance(r.get(key), (int, float)) and isinstance(r.get(x), (int, float))
           and math.isfinite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    a = np.asarray(pts, dtype=np.float64)
    return a[:, 0], a[:, 1]


def _train_records(records: list) -> list:
    """Training log records; after a resume the same step can appear twice: the later one wins."""
    by_step = {}
    for r in records:
        if "loss" in r and isinstance(r.get("step"), (int, float)):
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def _knn_records(records: list) -> list:
    by_step = {}
    for r in records:
        if isinstance(r.get("knn_top1"), (int, float)) and isinstance(r.get("step"), (int, float)):
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def steps_per_epoch(records: list) -> Optional[float]:
    for r in records:
        if r.get("step") and r.get("epoch"):
            return r["step"] / r["epoch"]
    return None


# --------------------------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------------------------
def plot_curves(records: list, path: Path, loss_name: str = "NT-Xent loss") -> Optional[Path]:
    """Loss and contrastive accuracy vs step."""
    tr = _train_records(records)
    s, loss = _series(tr, "loss")
    if not len(s):
        return None
    fig, ax = figure(9, 3.2, 1, 2)
    ax[0, 0].plot(s, loss, color="C0", marker="." if len(s) < 30 else None)
    ax[0, 0].set(xlabel="step", ylabel=loss_name, title="loss")
    s2, acc = _series(tr, "contrast_acc")
    if len(s2):
        ax[0, 1].plot(s2, acc, color="C1", marker="." if len(s2) < 30 else None)  # a fraction, as in metrics.jsonl
        ax[0, 1].set(xlabel="step", ylabel="fraction of views", title="contrastive accuracy (positive ranked first)")
    else:
        ax[0, 1].set_axis_off()
    for a in ax[0]:
        a.grid(alpha=0.3)
    return save(fig, path)


PLANNED_POINTS = 100_000  # the most steps of the planned schedule drawn one by one


def plot_lr(records: list, cfg: dict, path: Path) -> Optional[Path]:
    """The planned schedule (from the config) with the logged values on top."""
    tr = _train_records(records)
    s, lr = _series(tr, "lr")
    planned = steps = None
    try:
        from ..optim import lr_schedule
        if cfg.get("iters") and "lr" in cfg:
            iters = int(cfg["iters"])
            # at most PLANNED_POINTS points, spread over the steps: a config.yaml saying iters: 2e11 is drawn,
            # not a 1.5 TiB array (the schedule's shape depends on step / iters only)
            n = min(iters, PLANNED_POINTS)
            planned = lr_schedule(float(cfg["lr"]), n, str(cfg.get("lr_schedule", "warmup-anneal")),
                                  float(cfg.get("warmup", 0.0)))
            steps = np.arange(1, n + 1) * (iters / n)
    except (ValueError, TypeError, OverflowError):
        planned = None
    if planned is None and not len(s):
        return None
    fig, ax = figure(5.5, 3.2)
    a = ax[0, 0]
    if planned is not None:
        a.plot(steps, planned, color="0.6", lw=1.5,
               label=f"planned ({cfg.get('lr_schedule')})")
    if len(s):
        a.plot(s, lr, "o", ms=3, color="C2", label="logged")
    a.set(xlabel="step", ylabel="learning rate", title="learning-rate schedule")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    return save(fig, path)


def plot_accuracy(records: list, evals: list, path: Path, total_steps: Optional[float] = None,
                  run_data: str = "", run_tests: Optional[int] = None) -> Optional[Path]:
    """kNN top-1/top-5 vs step (epochs on the top axis); evaluation results marked at the last step."""
    fig = accuracy_figure(records, evals, total_steps, run_data, run_tests)
    return save(fig, path) if fig is not None else None


def eval_setting(ev: dict, run_data: str = "", run_tests: Optional[int] = None) -> str:
    """What makes an evaluation's number not comparable with a plain kNN / linear probe of the run's own dataset
    with all its labels: ``transfer to stl10``, ``500 labels``, ``fine-tuned`` (joined); '' for a plain one.
    ``run_tests``: the run's own test subset (0 = the whole split); an evaluation on another number of test
    images (``2000 test images``) measures another set, so it is named too."""
    data = ev.get("data") if isinstance(ev.get("data"), dict) else {}
    details = ev.get("details") if isinstance(ev.get("details"), dict) else {}
    config = ev.get("config") if isinstance(ev.get("config"), dict) else {}
    parts = []
    if run_data and data.get("name") and data["name"] != run_data:
        parts.append(f"transfer to {data['name']}")
    tests = config.get("test_subset", 0)
    if run_tests is not None and isinstance(tests, int) and (tests or 0) != (run_tests or 0):
        parts.append(f"{ev.get('n_test', tests or 'all')} test images")
    if isinstance(data.get("train_size"), int) and data["train_size"] > 0:
        parts.append(f"{data['train_size']} labels")
    if "finetune" in str(ev.get("protocol", "")) or details.get("finetune"):
        parts.append("fine-tuned")
    return ", ".join(parts)


def accuracy_figure(records: list, evals: list, total_steps: Optional[float] = None, run_data: str = "",
                    run_tests: Optional[int] = None):
    """Every figure of the report shares one x-axis, the optimizer step; the epoch is a secondary axis.
    Results comparable with the kNN curve (the run's dataset and test images, all labels, frozen encoder) are
    stars on it, side by side; the others (transfer, another test set, a label fraction, fine-tuning) get a panel
    of their own. The legend sits below."""
    kr = _knn_records(records)
    s, t1 = _series(kr, "knn_top1")
    _, t5 = _series(kr, "knn_top5")
    scored = [ev for ev in evals if isinstance(ev.get("top1"), (int, float))]
    if not len(s) and not scored:
        return None
    same = [ev for ev in scored if not eval_setting(ev, run_data, run_tests)]
    other = [ev for ev in scored if eval_setting(ev, run_data, run_tests)]
    n_legend = 2 * bool(len(s)) + len(same)
    legend_h = 0.25 * ((n_legend + 1) // 2)
    fig, ax = figure(5.5 + 4.5 * bool(other), 3.6 + legend_h, 1, 1 + bool(other))
    a = ax[0, 0]
    if len(s):
        a.plot(s, t1, "o-", color="C0", label="kNN top-1")
        if len(t5) == len(s):
            a.plot(s, t5, "s--", color="C0", alpha=0.5, label="kNN top-5")
    tr = _train_records(records)
    x_end = max([r.get("step", 0) or 0 for r in tr + kr] or [0])
    for i, ev in enumerate(same):  # results of one checkpoint side by side, not on top of each other
        x = x_end * (1 + 0.015 * (i - (len(same) - 1) / 2))
        a.plot([x], [ev["top1"]], "*", ms=14, color=f"C{(3 + i) % 10}",
               label=f"{ev.get('protocol', 'eval')} top-1 {ev['top1']:.1f}%")
    if total_steps:
        x_end = max(x_end, total_steps)
    if x_end > 0:
        a.set_xlim(-0.03 * x_end, 1.05 * x_end)
    if len(s) and s[0] == 0:
        a.annotate("random init", (0, t1[0]), textcoords="offset points", xytext=(8, 6), fontsize=8)  # clear of ticks
    a.set(xlabel="step", ylabel="accuracy (%)", title="accuracy (test split)")
    spe = steps_per_epoch(records)
    if spe:
        a.secondary_xaxis("top", functions=(lambda x: x / spe, lambda e: e * spe)).set_xlabel("epoch")
    a.grid(alpha=0.3)
    if n_legend:
        a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    if other:
        b = ax[0, 1]
        names = [f"{ev.get('protocol', 'eval')} ({eval_setting(ev, run_data, run_tests)})" for ev in other]
        b.barh(range(len(other)), [ev["top1"] for ev in other], color="C1")
        b.set_yticks(range(len(other)), names, fontsize=7)
        b.invert_yaxis()
        for i, ev in enumerate(other):
            b.text(ev["top1"], i, f" {ev['top1']:.1f}%", va="center", fontsize=7)
        b.set(xlabel="top-1 (%)", xlim=(0, 100), title="other settings (not comparable with the left)")
        b.grid(axis="x", alpha=0.3)
    return fig


def plot_speed(records: list, path: Path) -> Optional[Path]:
    """Throughput and the share (%) of each logging interval spent waiting for data."""
    tr = _train_records(records)
    s, ips = _series(tr, "images_per_s")
    if not len(s):
        return None
    _, dt = _series(tr, "data_time_frac")
    fig, ax = figure(9, 3.2, 1, 2)
    ax[0, 0].plot(s, ips, color="C4", marker="." if len(s) < 30 else None)
    ax[0, 0].set(xlabel="step", ylabel="images / s", title=f"throughput (median {rate(np.median(ips))} img/s)")
    ax[0, 0].set_ylim(bottom=0)
    if len(dt) == len(s):
        ax[0, 1].plot(s, 100 * dt, color="C5", marker="." if len(s) < 30 else None)
    ax[0, 1].set(xlabel="step", ylabel="% of step time", title="waiting for data")
    ax[0, 1].set_ylim(0, max(5.0, 100 * float(dt.max()) * 1.1) if len(dt) else 100)
    for a in ax[0]:
        a.grid(alpha=0.3)
    return save(fig, path)


# --------------------------------------------------------------------------------------------
# evaluation results
# --------------------------------------------------------------------------------------------
def confusion_matrix(ev: dict):
    """The eval.json's confusion matrix (counts, rows: true class) as an array, or None."""
    for key in ("confusion", "confusion_matrix"):
        m = ev.get(key)
        if isinstance(m, dict):
            m = m.get("matrix")
        if isinstance(m, list) and m and all(isinstance(r, list) for r in m):
            try:
                a = np.asarray(m, dtype=np.float64)
            except ValueError:
                return None
            if a.ndim == 2 and a.shape[0] == a.shape[1]:
                return a
    return None


def plot_eval(ev: dict, path: Path) -> Optional[Path]:
    """Confusion matrix (rows: true class, normalised per row) and/or per-class accuracy bars."""
    fig = eval_figure(ev)
    return save(fig, path) if fig is not None else None


def _finite(v) -> bool:
    """A number a plot can draw (not a string, a bool, null, NaN or a 400-digit integer)."""
    return isinstance(v, float) and math.isfinite(v) or isinstance(v, int) and not isinstance(v, bool) and abs(v) < 1e9


def eval_figure(ev: dict):
    cm = confusion_matrix(ev)
    per = ev.get("per_class") if isinstance(ev.get("per_class"), dict) else {}
    # an eval.json edited by hand (or another program's) may hold anything: only finite numbers are drawn
    per = {str(k): float(v) for k, v in per.items() if _finite(v)} or None
    if cm is None and not per:
        return None
    names = ev.get("classes") if isinstance(ev.get("classes"), list) else (list(per) if per else None)
    cols = (cm is not None) + bool(per)
    fig, ax = figure(6.0 * cols, 5.2, 1, cols)
    i = 0
    if cm is not None:
        n = cm.shape[0]
        names_cm = names if names and len(names) == n else [str(c) for c in range(n)]
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1e-12) * 100
        a = ax[0, i]
        im = a.imshow(norm, cmap="Blues", vmin=0, vmax=100)
        if n <= 20:
            a.set_xticks(range(n), names_cm, rotation=60, ha="right", fontsize=7)
            a.set_yticks(range(n), names_cm, fontsize=7)
            for r in range(n):
                for c in range(n):
                    a.text(c, r, f"{norm[r, c]:.0f}", ha="center", va="center", fontsize=6,
                           color="white" if norm[r, c] > 60 else "black")
        a.set(xlabel="predicted", ylabel="true", title="confusion matrix (% of each true class)")
        fig.colorbar(im, ax=a, fraction=0.046)
        i += 1
    if per:
        a = ax[0, i]
        keys = list(per)
        vals = [float(per[k]) for k in keys]
        a.barh(range(len(keys)), vals, color="C0")
        a.set_yticks(range(len(keys)), keys, fontsize=7 if len(keys) <= 30 else 4)
        a.invert_yaxis()
        a.set(xlabel="top-1 accuracy (%)", xlim=(0, 100), title="per-class accuracy")
        if isinstance(ev.get("top1"), (int, float)):
            a.axvline(ev["top1"], color="k", ls="--", lw=1)
        a.grid(axis="x", alpha=0.3)
    return fig


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------
_MISSING = "<missing>"


# what sets runs apart, most telling first: the run's labels and the difference table follow this order. A display
# order, not an option role (simclr.config.ROLES): a key left out is shown after these, alphabetically
KEY_ORDER = ("iters", "lr", "width", "temperature", "batch_size", "arch", "data", "multiplier", "opt",
             "weight_decay", "lr_schedule", "warmup", "proj_dim", "proj_layers", "color_dist_s", "scale_lower",
             "blur", "image_size", "train_subset", "precision", "seed")
# where or how a run ran, not what it trained: never a config difference (listed apart); the options declare it
BOOKKEEPING = frozenset(with_role(PretrainConfig, "bookkeeping") + with_role(EvalConfig, "bookkeeping"))


def _key_rank(key: str) -> tuple:
    return (KEY_ORDER.index(key) if key in KEY_ORDER else len(KEY_ORDER), key)


def config_diff(configs: Sequence[dict], bookkeeping: bool = False) -> dict:
    """{key: [value in run 1, run 2, ...]} for the keys whose values are not all equal, the keys of
    :data:`KEY_ORDER` first (in that order), then the rest alphabetically. The keys of :data:`BOOKKEEPING`
    are left out (``bookkeeping=True``: only they).

    A key absent from some runs counts as differing (shown as ``<missing>``)."""
    keys = sorted(set().union(*[set(c) for c in configs]), key=_key_rank) if configs else []
    out = {}
    for k in keys:
        if (k in BOOKKEEPING) != bookkeeping:
            continue
        vals = [c.get(k, _MISSING) for c in configs]
        if any(v != vals[0] for v in vals[1:]):
            out[k] = vals
    return out


def plot_compare(runs: Sequence[Path], labels: Sequence[str], path: Path) -> Path:
    """Loss, contrastive accuracy, kNN top-1, learning rate, throughput and data wait of all runs."""
    fig, ax = figure(13, 6.4, 2, 3)
    panels = [(ax[0, 0], "loss", "step", "NT-Xent loss", 1),
              (ax[0, 1], "contrast_acc", "step", "contrastive acc. (fraction)", 1),
              (ax[0, 2], "knn_top1", "step", "kNN top-1 (%)", 1),
              (ax[1, 0], "lr", "step", "learning rate", 1),
              (ax[1, 1], "images_per_s", "step", "images / s", 1),
              (ax[1, 2], "data_time_frac", "step", "data wait (% of step time)", 100)]
    for i, (run, label) in enumerate(zip(runs, labels)):
        recs = read_metrics(run)
        tr, kr = _train_records(recs), _knn_records(recs)
        for a, key, x, ylabel, scale in panels:
            src = kr if key == "knn_top1" else tr
            xs, ys = _series(src, key, x)
            if len(xs):
                a.plot(xs, ys * scale, "o-" if key == "knn_top1" or len(xs) < 30 else "-", ms=3, color=f"C{i % 10}",
                       label=label)
    for a, key, x, ylabel, _ in panels:
        a.set(xlabel=x, ylabel=ylabel)
        a.grid(alpha=0.3)
    handles, labs = ax[0, 0].get_legend_handles_labels()
    if not handles:
        for a in ax.ravel():
            handles, labs = a.get_legend_handles_labels()
            if handles:
                break
    if handles:
        fig.legend(handles, labs, loc="upper center", ncol=min(len(labs), 3), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9 if len(labs) <= 3 else 0.82))
    return save(fig, path, tight=False)


def compare(run_dirs: Sequence, out: Path) -> tuple[dict, Path]:
    """Plot runs together into ``out`` (a PNG) and return (config differences, path)."""
    runs = [Path(r) for r in run_dirs]
    configs = [read_config(r) for r in runs]
    diff = config_diff(configs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return diff, plot_compare(runs, run_labels(runs, configs, diff), out)


def run_labels(runs: Sequence[Path], configs: Sequence[dict], diff: dict, n: int = 3) -> list:
    """Each run's legend label: ``name/run-id (key=value, ...)`` with the ``n`` most telling differing keys."""
    show = list(diff)[:n]
    labels = []
    for r, c in zip(runs, configs):
        extra = ", ".join(f"{k}={c.get(k, _MISSING)}" for k in show)
        labels.append(f"{Path(r).parent.name}/{Path(r).name}" + (f" ({extra})" if extra else ""))
    return labels

