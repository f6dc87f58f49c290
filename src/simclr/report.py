"""Look at runs: a static HTML report per run folder, and several runs compared on one figure.

``simclr report RUN_DIR`` writes ``RUN_DIR/report.html`` with its pictures in ``RUN_DIR/report/``
(plain PNGs beside the page: it opens from the file system, no server):

    curves.png      loss and contrastive accuracy vs step
    lr.png          the planned learning-rate schedule and the logged values
    accuracy.png    kNN top-1/top-5 vs epoch (+ linear top-1 from eval.json)
    speed.png       images/s and the fraction of time spent waiting for data
    views.png       augmented views from the run's own augmentation settings
    retrieval.png   test queries and their 8 nearest training images (by h, the representation)
    embedding.png   2-D PCA of test-image representations, coloured by class
    confusion.png   confusion matrix / per-class accuracy from eval.json, when present

``simclr compare RUN_A RUN_B ...`` draws the curves of all runs on shared axes and lists the
config keys whose values differ.

Figures are drawn with matplotlib's object API on an Agg canvas, so importing this module never
changes the caller's matplotlib backend (a notebook keeps its own).
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import runs as runs_lib
from .runs.index import encoder_sha as _encoder_sha
from .errors import DataError, UserError

PICTURES = "report"  # sub-folder of the run folder holding the PNGs
DPI = 110


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _figure(w: float, h: float, rows: int = 1, cols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=DPI)
    os.replace(tmp, path)
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


def _steps_per_epoch(records: list) -> Optional[float]:
    for r in records:
        if r.get("step") and r.get("epoch"):
            return r["step"] / r["epoch"]
    return None


def resolve_run(arg: str) -> Path:
    """A run folder given as a path, or as a run id found under the default runs root."""
    p = Path(arg)
    if p.is_dir():
        if not any((p / m).exists() for m in runs_lib.MARKERS):
            raise UserError(f"{p} is not a run folder (it holds none of {', '.join(runs_lib.MARKERS)})")
        return p
    from .options import default_root
    root = Path(default_root())
    hits = sorted(root.glob(f"*/{p.name}")) if root.is_dir() and p.name == arg else []
    hits = [h for h in hits if h.is_dir()]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise UserError(f"run id {arg!r} matches several folders: {', '.join(map(str, hits))}; pass the path")
    raise UserError(f"run folder not found: {arg} (pass logs/<name>/<run-id>; `simclr runs` lists them)")


# --------------------------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------------------------
def plot_curves(records: list, path: Path, loss_name: str = "NT-Xent loss") -> Optional[Path]:
    """Loss and contrastive accuracy vs step."""
    tr = _train_records(records)
    s, loss = _series(tr, "loss")
    if not len(s):
        return None
    fig, ax = _figure(9, 3.2, 1, 2)
    ax[0, 0].plot(s, loss, color="C0", marker="." if len(s) < 30 else None)
    ax[0, 0].set(xlabel="step", ylabel=loss_name, title="loss")
    s2, acc = _series(tr, "contrast_acc")
    if len(s2):
        ax[0, 1].plot(s2, 100 * acc, color="C1", marker="." if len(s2) < 30 else None)
        ax[0, 1].set(xlabel="step", ylabel="%", title="contrastive accuracy (positive ranked first)")
    else:
        ax[0, 1].set_axis_off()
    for a in ax[0]:
        a.grid(alpha=0.3)
    return _save(fig, path)


def plot_lr(records: list, cfg: dict, path: Path) -> Optional[Path]:
    """The planned schedule (from the config) with the logged values on top."""
    tr = _train_records(records)
    s, lr = _series(tr, "lr")
    planned = None
    try:
        from .optim import lr_schedule
        if cfg.get("iters") and "lr" in cfg:
            planned = lr_schedule(float(cfg["lr"]), int(cfg["iters"]), str(cfg.get("lr_schedule", "warmup-anneal")),
                                  float(cfg.get("warmup", 0.0)))
    except (ValueError, TypeError):
        planned = None
    if planned is None and not len(s):
        return None
    fig, ax = _figure(5.5, 3.2)
    a = ax[0, 0]
    if planned is not None:
        a.plot(np.arange(1, len(planned) + 1), planned, color="0.6", lw=1.5, label=f"planned ({cfg.get('lr_schedule')})")
    if len(s):
        a.plot(s, lr, "o", ms=3, color="C2", label="logged")
    a.set(xlabel="step", ylabel="learning rate", title="learning-rate schedule")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy(records: list, evals: list, path: Path, total_epochs: Optional[float] = None) -> Optional[Path]:
    """kNN top-1/top-5 vs epoch; linear (or other protocol) top-1 marked at the last epoch."""
    kr = _knn_records(records)
    e, t1 = _series(kr, "knn_top1", "epoch")
    _, t5 = _series(kr, "knn_top5", "epoch")
    scored = [ev for ev in evals if isinstance(ev.get("top1"), (int, float))]
    if not len(e) and not scored:
        return None
    fig, ax = _figure(5.5, 3.4)
    a = ax[0, 0]
    if len(e):
        a.plot(e, t1, "o-", color="C0", label="kNN top-1")
        if len(t5) == len(e):
            a.plot(e, t5, "s--", color="C0", alpha=0.5, label="kNN top-5")
    tr = _train_records(records)
    x_end = max([r.get("epoch", 0) or 0 for r in tr + kr] or [0])
    for i, ev in enumerate(scored):
        a.plot([x_end], [ev["top1"]], "*", ms=14, color=f"C{3 + i}",
               label=f"{ev.get('protocol', 'eval')} top-1 {ev['top1']:.1f}%")
    if total_epochs:
        x_end = max(x_end, total_epochs)
    if x_end > 0:
        a.set_xlim(-0.03 * x_end, 1.05 * x_end)
    if len(e) and e[0] == 0:
        a.annotate("random init", (0, t1[0]), textcoords="offset points", xytext=(6, -12), fontsize=8)
    a.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy (test split)")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    return _save(fig, path)


def plot_speed(records: list, path: Path) -> Optional[Path]:
    """Throughput and the fraction of each logging interval spent waiting for data."""
    tr = _train_records(records)
    s, ips = _series(tr, "images_per_s")
    if not len(s):
        return None
    _, dt = _series(tr, "data_time_frac")
    fig, ax = _figure(9, 3.2, 1, 2)
    ax[0, 0].plot(s, ips, color="C4", marker="." if len(s) < 30 else None)
    ax[0, 0].set(xlabel="step", ylabel="images / s", title=f"throughput (median {np.median(ips):.0f} img/s)")
    ax[0, 0].set_ylim(bottom=0)
    if len(dt) == len(s):
        ax[0, 1].plot(s, 100 * dt, color="C5", marker="." if len(s) < 30 else None)
    ax[0, 1].set(xlabel="step", ylabel="% of step time", title="waiting for data")
    ax[0, 1].set_ylim(0, max(5.0, 100 * float(dt.max()) * 1.1) if len(dt) else 100)
    for a in ax[0]:
        a.grid(alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# pictures: augmented views, retrieval, embedding
# --------------------------------------------------------------------------------------------
def _to_hwc(x) -> np.ndarray:
    return x.permute(1, 2, 0).clamp(0, 1).numpy()


def _display_transform(ds, size: int):
    from .data.transforms import eval_transform
    arr = getattr(ds, "images", None)
    return eval_transform(size, arr.shape[1] if arr is not None else -1)


class _Datasets:
    """get_dataset with a memo for one report: decoding CIFAR's 50,000 images takes seconds, once is enough."""

    def __init__(self, cfg: dict):
        self.data = str(cfg.get("data", "cifar10"))
        self.path = str(cfg.get("data_path", "") or "")
        self._memo: dict = {}

    def __call__(self, split: str, size: int):
        from .data import get_dataset, native_size
        if split == "pretrain" and self.data != "stl10":  # the same images as the labelled train split
            split = "train"
        size = native_size(self.data, size)
        key = (split, size)
        if key not in self._memo:
            self._memo[key] = get_dataset(self.data, split, self.path, size)
        return self._memo[key]


def plot_views(cfg: dict, path: Path, n_images: int = 6, n_views: int = 6, seed: int = 0,
               datasets: Optional[_Datasets] = None) -> tuple:
    """Rows: one training image, then ``n_views`` views drawn by the run's augmentation
    (:func:`simclr.data.transforms.simclr_transform` with its image size, colour strength, crop scale
    and blur), i.e. what the network is trained on. Returns (path, caption)."""
    import torch
    from .data import maybe_subset
    from .data.transforms import simclr_transform, use_blur
    datasets = datasets or _Datasets(cfg)
    data = datasets.data
    size = int(cfg.get("image_size", 0) or 0)
    # labelled images (for STL-10 the unlabeled part would do as well, but its loading is slow)
    pick = maybe_subset(datasets("train", size), n_images, seed=seed)
    size = pick.image_size
    s, scale, blur = float(cfg.get("color_dist_s", 1.0)), float(cfg.get("scale_lower", 0.08)), str(cfg.get("blur", "auto"))
    aug = bool(cfg.get("aug", True))
    tf = simclr_transform(size, s, scale, blur)
    show = _display_transform(pick, size)
    fig, ax = _figure(1.25 * (n_views + 1), 1.3 * len(pick) + 0.4, len(pick), n_views + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(len(pick)):
            img = pick.load(i)
            ax[i, 0].imshow(_to_hwc(show(img)), interpolation="nearest")
            for j in range(n_views):
                ax[i, j + 1].imshow(_to_hwc(tf(img) if aug else show(img)), interpolation="nearest")
    for a in ax.ravel():
        a.set_xticks([])
        a.set_yticks([])
    ax[0, 0].set_title("image", fontsize=9)
    for j in range(n_views):
        ax[0, j + 1].set_title(f"view {j + 1}", fontsize=9)
    _save(fig, path)
    caption = (f"{len(pick)} training images of {data} and {n_views} augmented views each, drawn with this run's "
               f"settings: {size}px random resized crop (scale {scale}-1), flip, colour distortion s={s}, "
               f"grayscale p=0.2, blur {'on' if use_blur(size, blur) else 'off'} (blur={blur}).")
    if not aug:
        caption += " This run has aug: false, so every view is the plain image."
    return path, caption


def load_run_encoder(run: Path, cfg: dict, log=print):
    """The encoder of the run's newest loadable checkpoint (or, for an eval run, its encoder_ckpt)."""
    from .checkpoint import list_checkpoints
    from .errors import CheckpointError
    from .weights import load_encoder
    candidates = list(list_checkpoints(run))
    enc = cfg.get("encoder_ckpt")
    if isinstance(enc, str) and enc:  # an eval run: its checkpoints are heads, the encoder lies elsewhere
        candidates.insert(0, Path(enc))
    for p in candidates:
        try:
            return load_encoder(p), p
        except CheckpointError as e:
            log(f"note: skipping {p}: {e}")
    return None, None


def _features(encoder, ds, size: int, device):
    import torch
    from .evaluate import extract_features
    with torch.no_grad():
        f, y = extract_features(encoder, ds, size, 256, 0, device)
    return torch.nn.functional.normalize(f.float(), dim=1).cpu(), y.cpu()


def plot_retrieval_and_embedding(encoder, cfg: dict, out_dir: Path, n_queries: int = 8, k: int = 8,
                                 gallery: int = 1000, n_embed: int = 500, device: str = "cpu",
                                 datasets: Optional[_Datasets] = None) -> dict:
    """Nearest-neighbour retrieval grid and 2-D PCA embedding from the learned representation h.

    Gallery: a class-balanced subset of the labelled training split; queries and the embedding:
    class-balanced subsets of the test split. Similarity: cosine of h (as the kNN monitor).
    Returns {"retrieval": (path, caption), "embedding": (path, caption)}.
    """
    import torch
    from .data import maybe_subset
    dev = torch.device(device)
    encoder = encoder.to(dev).eval()
    datasets = datasets or _Datasets(cfg)
    size = int(cfg.get("image_size", 0) or 0) or encoder.input_size
    train = maybe_subset(datasets("train", size), gallery, seed=0)
    test = maybe_subset(datasets("test", size), n_embed, seed=1)
    size = train.image_size
    g_f, g_y = _features(encoder, train, size, dev)
    t_f, t_y = _features(encoder, test, size, dev)
    classes = list(train.classes)
    out = {}

    # retrieval: one query per class (up to n_queries), taken from the embedded test subset
    q_idx = []
    for c in range(len(classes)):
        hit = (t_y == c).nonzero().flatten()
        if len(hit):
            q_idx.append(int(hit[0]))
        if len(q_idx) == n_queries:
            break
    sims = t_f[q_idx] @ g_f.T
    top = sims.topk(min(k, len(train)), dim=1)
    show_tr, show_te = _display_transform(train, size), _display_transform(test, size)
    kk = top.indices.shape[1]
    fig, ax = _figure(1.15 * (kk + 1) + 0.3, 1.3 * len(q_idx) + 0.5, len(q_idx), kk + 1)
    same = 0
    for r, qi in enumerate(q_idx):
        qy = int(t_y[qi])
        ax[r, 0].imshow(_to_hwc(show_te(test.load(qi))), interpolation="nearest")
        ax[r, 0].set_title(f"query: {classes[qy]}", fontsize=8, color="navy")
        for j in range(kk):
            gi = int(top.indices[r, j])
            ok = int(g_y[gi]) == qy
            same += ok
            a = ax[r, j + 1]
            a.imshow(_to_hwc(show_tr(train.load(gi))), interpolation="nearest")
            a.set_title(f"{classes[int(g_y[gi])]} {float(top.values[r, j]):.2f}", fontsize=7,
                        color="green" if ok else "red")
            for sp in a.spines.values():
                sp.set_edgecolor("green" if ok else "red")
                sp.set_linewidth(2.5)
    for a in ax.ravel():
        a.set_xticks([])
        a.set_yticks([])
    p = _save(fig, out_dir / "retrieval.png")
    frac = 100.0 * same / max(1, len(q_idx) * kk)
    out["retrieval"] = (p, f"Left: a test image; right: its {kk} nearest of {len(train)} training images by cosine "
                           f"similarity of h (value above each). Green: same class as the query, red: another "
                           f"class; {frac:.0f}% of neighbours share the query's class "
                           f"(chance {100.0 / max(1, len(classes)):.0f}%).")

    # embedding: PCA to 2-D (a linear map: distances are not distorted the way t-SNE's are)
    x = t_f - t_f.mean(0, keepdim=True)
    _, sv, v = torch.linalg.svd(x, full_matrices=False)
    xy = (x @ v[:2].T).numpy()
    var = (sv[:2] ** 2 / (sv ** 2).sum()).numpy() * 100
    fig, ax = _figure(6.4, 5.0)
    a = ax[0, 0]
    cmap = "tab10" if len(classes) <= 10 else "tab20"
    import matplotlib
    colors = matplotlib.colormaps[cmap]
    ty = t_y.numpy()
    for c in range(len(classes)):
        m = ty == c
        if m.any():
            a.scatter(xy[m, 0], xy[m, 1], s=7, alpha=0.7, color=colors(c % colors.N), label=classes[c])
    a.set(xlabel=f"PC 1 ({var[0]:.0f}% of variance)", ylabel=f"PC 2 ({var[1]:.0f}%)",
          title=f"h of {len(test)} test images, PCA")
    if len(classes) <= 20:
        a.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    p = _save(fig, out_dir / "embedding.png")
    out["embedding"] = (p, f"The representation h of {len(test)} test images projected on its first two principal "
                           f"components, coloured by the true class; the classes are never seen in pretraining.")
    return out


# --------------------------------------------------------------------------------------------
# evaluation results
# --------------------------------------------------------------------------------------------
def _confusion(ev: dict):
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
    cm = _confusion(ev)
    per = ev.get("per_class") if isinstance(ev.get("per_class"), dict) else None
    if cm is None and not per:
        return None
    names = ev.get("classes") if isinstance(ev.get("classes"), list) else (list(per) if per else None)
    cols = (cm is not None) + bool(per)
    fig, ax = _figure(6.0 * cols, 5.2, 1, cols)
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
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# the HTML page
# --------------------------------------------------------------------------------------------
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{padding:.2em .8em;border-bottom:1px solid #eee;text-align:left}
img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em;margin:.3em 0 1em}
.note{color:#8a5a00}.failed{color:#b00}.interrupted{color:#b60}.finished{color:#070}.running{color:#06c}"""


def _esc(x) -> str:
    return html.escape(str(x))


def _table(rows: Sequence[tuple]) -> str:
    return "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows) + "</table>"


def _fmt(v, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def write_report(run_dir, out: Optional[Path] = None, pictures: bool = True, n_queries: int = 8,
                 gallery: int = 0, n_embed: int = 0, device: str = "cpu", log=print) -> Path:
    """Write ``report.html`` (+ PNGs in ``report/``) for a run folder; returns the HTML path.

    Every section whose inputs are missing (no metrics yet, no checkpoint, data not found) is
    replaced by a one-line note instead of failing the whole report. ``pictures=False`` skips
    the sections that need the dataset (views, retrieval, embedding).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    out = Path(out) if out else run
    pic_dir = out / PICTURES
    try:
        pic_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the report into {out}: {e.strerror}; pass --out DIR") from None
    for old in pic_dir.glob("*.png"):  # stale pictures of an earlier report must not linger
        old.unlink(missing_ok=True)

    t0 = time.perf_counter()
    cfg = runs_lib.read_config(run)
    records = runs_lib.read_metrics(run)
    evals = runs_lib.read_evals(run)
    row = runs_lib.summarize(run)
    env = runs_lib.read_json(run / "env.json") or {}
    if not os.environ.get("DATA_ROOT") and env.get("data_root"):
        # the pictures need the run's images: read them from where the run read them
        os.environ["DATA_ROOT"] = env["data_root"]
    figures: list = []  # (title, relative path or None, caption or note)

    def add(title, produced, caption, missing):
        if produced is not None and Path(produced).exists():
            figures.append((title, f"{PICTURES}/{Path(produced).name}", caption))
        else:
            figures.append((title, None, missing))

    is_eval = row["kind"] == "eval"
    add("Loss and contrastive accuracy", plot_curves(records, pic_dir / "curves.png",
                                                     "training loss of the head" if is_eval else "NT-Xent loss"),
        "NT-Xent loss and the fraction of anchors whose positive scores highest among all 2N-1 candidates, "
        "at each logged step.", "no training records in metrics.jsonl yet")
    add("Learning-rate schedule", plot_lr(records, cfg, pic_dir / "lr.png"),
        "Grey: the schedule computed from the config for every step; dots: the values logged by the run.",
        "no learning rate in config.yaml or metrics.jsonl")
    spe = _steps_per_epoch(records)
    total_epochs = float(cfg["iters"]) / spe if spe and isinstance(cfg.get("iters"), (int, float)) else None
    add("Accuracy", plot_accuracy(records, evals, pic_dir / "accuracy.png", total_epochs),
        "Weighted kNN on the frozen representation (train split -> test split) at each evaluation; "
        "stars: results of evaluation runs (eval.json) in this folder.",
        "no kNN evaluation in metrics.jsonl and no eval.json")
    add("Throughput and data wait", plot_speed(records, pic_dir / "speed.png"),
        "Images per second over each logging interval, and the share of that interval the loop waited for "
        "the next batch (high values: the input pipeline is the bottleneck).",
        "no throughput records in metrics.jsonl")

    if pictures and cfg:
        datasets = _Datasets(cfg)
        try:
            p, cap = plot_views(cfg, pic_dir / "views.png", datasets=datasets)
            add("What the network sees: augmented views", p, cap, "")
        except (DataError, UserError, OSError) as e:
            add("What the network sees: augmented views", None, None, f"skipped: {e}")
        encoder, src = load_run_encoder(run, cfg, log=log)
        if encoder is None:
            add("Nearest-neighbour retrieval", None, None, "skipped: no loadable encoder checkpoint in this run")
        else:
            big = (encoder.input_size or 32) > 64
            try:
                res = plot_retrieval_and_embedding(encoder, cfg, pic_dir, n_queries=n_queries,
                                                   gallery=gallery or (300 if big else 1000),
                                                   n_embed=n_embed or (300 if big else 500), device=device,
                                                   datasets=datasets)
                add("Nearest-neighbour retrieval", res["retrieval"][0],
                    res["retrieval"][1] + f" Encoder: {src.name}.", "")
                add("Embedding", res["embedding"][0], res["embedding"][1], "")
            except (DataError, UserError, OSError) as e:
                add("Nearest-neighbour retrieval", None, None, f"skipped: {e}")
    elif not cfg:
        add("Pictures", None, None, "skipped: the run has no readable config.yaml")
    else:
        add("Pictures", None, None, "augmented views, retrieval and embedding skipped (--no_pictures)")

    for i, ev in enumerate(evals):
        name = f"eval{i}.png" if len(evals) > 1 else "confusion.png"
        add(f"Evaluation: {ev.get('protocol', 'eval')} ({ev.get('_file')})", plot_eval(ev, pic_dir / name),
            f"From {ev.get('_file')}: rows are true classes, each normalised to 100%.",
            f"{ev.get('_file')} holds no confusion matrix or per-class accuracy")

    status = row["status"]
    facts = [("run", str(run)), ("status", status + (f" ({row['error']})" if row.get("error") else "")),
             ("steps", f"{_fmt(row.get('step'))} / {_fmt(row.get('iters'))}"),
             ("last loss", _fmt(row.get("loss"), 4)), ("kNN top-1 (best)", _fmt(row.get("knn"))),
             ("kNN top-1 at random init", _fmt(row.get("knn_init"))),
             ("linear top-1", _fmt(row.get("linear"))), ("images/s (median, recent)", _fmt(row.get("images_per_s"), 0)),
             ("started", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["started"])) if row.get("started") else "-"),
             ("duration", time.strftime("%H:%M:%S", time.gmtime(row["duration"])) if row.get("duration") else "-")]
    env_rows = [(k, env[k]) for k in ("device", "gpu", "host", "torch", "torchvision", "python", "git_commit",
                                       "command", "cwd") if env.get(k)]
    eval_rows = []
    for ev in evals:
        eval_rows.append((f"{ev.get('protocol', 'eval')} ({ev.get('_file')})",
                          f"top-1 {_fmt(ev.get('top1'))}%, top-5 {_fmt(ev.get('top5'))}%"
                          + (f", encoder sha256 {_encoder_sha(ev)[:12]}" if _encoder_sha(ev) else "")))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(row['name'])} / {_esc(row['id'])}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>{_esc(row['name'])} / {_esc(row['id'])} <span class='{_esc(status)}'>{_esc(status)}</span></h1>",
             _table(facts)]
    if eval_rows:
        parts += ["<h2>Evaluation results</h2>", _table(eval_rows)]
    for title, src_, text in figures:
        parts.append(f"<h2>{_esc(title)}</h2>")
        if src_:
            parts.append(f"<figure><img src='{_esc(src_)}' alt='{_esc(title)}'><figcaption>{_esc(text)}"
                         f"</figcaption></figure>")
        else:
            parts.append(f"<p class='note'>{_esc(text)}</p>")
    parts += ["<h2>Config</h2><details><summary>all keys</summary>", _table(sorted(cfg.items())), "</details>",
              "<h2>Environment</h2>", _table(env_rows),
              f"<p class='note'>Written by <code>simclr report</code> on {time.strftime('%Y-%m-%d %H:%M:%S')} "
              f"in {time.perf_counter() - t0:.1f} s.</p></body></html>"]
    page = out / "report.html"
    tmp = out / f".report.html.tmp{os.getpid()}"
    tmp.write_text("\n".join(parts))
    os.replace(tmp, page)
    return page


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------
_MISSING = "<missing>"


def config_diff(configs: Sequence[dict]) -> dict:
    """{key: [value in run 1, run 2, ...]} for the keys whose values are not all equal.

    A key absent from some runs counts as differing (shown as ``<missing>``)."""
    keys = sorted(set().union(*[set(c) for c in configs])) if configs else []
    out = {}
    for k in keys:
        vals = [c.get(k, _MISSING) for c in configs]
        if any(v != vals[0] for v in vals[1:]):
            out[k] = vals
    return out


def plot_compare(runs: Sequence[Path], labels: Sequence[str], path: Path) -> Path:
    """Loss, contrastive accuracy, kNN top-1, learning rate, throughput and data wait of all runs."""
    fig, ax = _figure(13, 6.4, 2, 3)
    panels = [(ax[0, 0], "loss", "step", "NT-Xent loss", 1), (ax[0, 1], "contrast_acc", "step", "contrastive acc. (%)", 100),
              (ax[0, 2], "knn_top1", "epoch", "kNN top-1 (%)", 1), (ax[1, 0], "lr", "step", "learning rate", 1),
              (ax[1, 1], "images_per_s", "step", "images / s", 1), (ax[1, 2], "data_time_frac", "step", "data wait (%)", 100)]
    for i, (run, label) in enumerate(zip(runs, labels)):
        recs = runs_lib.read_metrics(run)
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
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=DPI)
    os.replace(tmp, path)
    return path


def compare(run_dirs: Sequence, out: Path) -> tuple[dict, Path]:
    """Plot runs together into ``out`` (a PNG) and return (config differences, path)."""
    runs = [Path(r) for r in run_dirs]
    configs = [runs_lib.read_config(r) for r in runs]
    diff = config_diff(configs)
    show = [k for k in diff if k not in ("name",)][:3]  # the legend names each run by what sets it apart
    labels = []
    for r, c in zip(runs, configs):
        extra = ", ".join(f"{k}={c.get(k, _MISSING)}" for k in show)
        labels.append(f"{r.parent.name}/{r.name}" + (f" ({extra})" if extra else ""))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return diff, plot_compare(runs, labels, out)


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------
def report_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="simclr report", description="Write report.html (+ PNGs in report/) for a "
                                 "run folder: curves, LR schedule, accuracy, speed, augmented views, nearest "
                                 "neighbours, embedding, confusion matrix. Opens from the file system.")
    ap.add_argument("run", help="run folder (logs/<name>/<run-id>) or a run id under the runs root")
    ap.add_argument("--out", default="", help="folder to write into (default: the run folder)")
    ap.add_argument("--no_pictures", action="store_true", help="skip views/retrieval/embedding (no dataset needed)")
    ap.add_argument("--queries", type=int, default=8, help="retrieval queries (one per class, at most #classes)")
    ap.add_argument("--gallery", type=int, default=0, help="training images searched for neighbours "
                    "(default 1000; 300 for images > 64 px)")
    ap.add_argument("--embed", type=int, default=0, help="test images in the embedding plot (default 500; 300 "
                    "for images > 64 px)")
    ap.add_argument("--device", default="cpu", help="device for feature extraction (cpu, cuda)")
    args = ap.parse_args(list(argv))
    if args.queries < 1 or args.gallery < 0 or args.embed < 0:
        raise UserError("--queries must be >= 1 and --gallery/--embed >= 0")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UserError("--device cuda was requested but CUDA is not available; use --device cpu")
    run = resolve_run(args.run)
    page = write_report(run, Path(args.out) if args.out else None, pictures=not args.no_pictures,
                        n_queries=args.queries, gallery=args.gallery, n_embed=args.embed, device=args.device)
    print(f"report: {page}")
    return 0


def compare_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="simclr compare", description="Plot two or more runs on shared axes and "
                                 "list the config keys whose values differ.")
    ap.add_argument("runs", nargs="+", help="run folders (or run ids under the runs root)")
    ap.add_argument("--out", default="compare.png", help="figure to write (default: ./compare.png)")
    ap.add_argument("--json", action="store_true", help="print the differences as JSON")
    args = ap.parse_args(list(argv))
    if len(args.runs) < 2:
        raise UserError("compare needs at least two run folders")
    runs = [resolve_run(r) for r in args.runs]
    diff, png = compare(runs, Path(args.out))
    if args.json:
        print(json.dumps({"runs": [str(r) for r in runs], "differences": diff, "figure": str(png)}, indent=1,
                         default=str))
        return 0
    if diff:
        import pandas as pd
        table = pd.DataFrame({f"[{i + 1}]": [str(v[i]) for v in diff.values()] for i in range(len(runs))},
                             index=list(diff))
        print("config keys that differ:")
        print(table.to_string())
    else:
        print("the configs are identical")
    for i, r in enumerate(runs):
        print(f"[{i + 1}] {r}")
    print(f"figure: {png}")
    return 0
