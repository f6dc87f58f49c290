"""Reading run folders: the index, one pandas row per run.

A run folder is any folder holding one of :data:`MARKERS` (the layout :mod:`simclr.rundir` writes).
Every reader of a run folder is tolerant: a missing, half-written or unparsable file gives an empty
value and the row says why, never an exception. ``index(root)`` is the public entry point (also reachable as
``simclr.runs.index``); ``Index(root).info()`` is the spec's spelling of it.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import socket
import time
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..rundir import MAX_NAME_PARTS
from .evals import eval_columns, eval_summary, is_baseline, link_evals
from .folder import finite, metrics_summary, read_config, read_evals, read_json, skipped_files
from .status import effective_status

MARKERS = ("status.json", "config.yaml", "metrics.jsonl", "eval.json")
_NOT_RUNS = {"checkpoints", "tb", "report", "features", "__pycache__"}
# --name a/b/c/d puts a run 5 folders below the root: every name a run may have (rundir.MAX_NAME_PARTS) is listed
_MAX_DEPTH = MAX_NAME_PARTS + 1

# The columns `simclr runs` shows by default, in this order: a display list, not an option role (simclr.config.ROLES).
SUMMARY_COLUMNS = ["id", "name", "kind", "status", "arch", "data", "batch_size", "step", "iters", "loss", "knn",
                   "linear", "protocol", "images_per_s", "started", "duration"]


def find_runs(root) -> list:
    """Run folders under ``root`` (any folder holding one of MARKERS), sorted by path.

    ``root`` may itself be a run folder. Uses ``os.scandir`` (one system call per folder) so
    that listing thousands of runs stays fast.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"runs folder not found: {root} (pass --root DIR, or set SIMCLR_LOGS)")
    found, seen = [], set()
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:  # a folder reached twice through links: a loop, or listed already
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(folder))
        except OSError:
            continue
        names = {e.name for e in entries}
        if any(m in names for m in MARKERS):
            found.append(folder)
            continue
        if depth < _MAX_DEPTH:
            for e in entries:
                # symlinked run folders are followed; a folder is entered once (a link loop ends)
                if e.name not in _NOT_RUNS and not e.name.startswith(".") and e.is_dir():
                    stack.append((Path(e.path), depth + 1))
    return sorted(found)



def safe_summarize(run: Path, now: Optional[float] = None, host: Optional[str] = None) -> dict:
    """:func:`summarize`, or, for a folder whose files hold values no table can show, a row that says so: one
    bad run costs its row, never the table."""
    try:
        return summarize(run, now, host)
    except (ValueError, TypeError, OverflowError, RecursionError, AttributeError, KeyError) as e:
        return {"id": Path(run).name, "name": Path(run).parent.name, "status": "unknown", "kind": "pretrain",
                "path": str(run), "error": f"unreadable run folder: {type(e).__name__}: {str(e)[:100]}"}


def summarize(run: Path, now: Optional[float] = None, host: Optional[str] = None) -> dict:
    """One index row for a run folder: flattened config, then summary fields on top."""
    run = Path(run)
    cfg = read_config(run)
    st = read_json(run / "status.json")
    st = st if isinstance(st, dict) else {}
    if st:
        status, reason = effective_status(st, now, host)
    else:
        status = "unknown"
        reason = "status.json unreadable" if (run / "status.json").exists() else "no status.json"
    m = metrics_summary(run / "metrics.jsonl")
    evals = read_evals(run)
    row = dict(cfg)
    k = cfg.get("width_multiplier")
    if isinstance(k, int) and k > 1 and isinstance(cfg.get("arch"), str):  # as the papers write it: resnet50x2
        row["arch"] = f"{cfg['arch']}x{k}"
    kind = "pretrain"
    if evals or cfg.get("problem") == "eval":
        kind = "baseline" if is_baseline(evals, cfg) else "eval"
    started, updated = (v if finite(v) else None for v in (st.get("started"), st.get("updated")))
    if status == "running" and started is not None:
        end = time.time() if now is None else now
    else:
        end = updated
    step = max([s for s in (st.get("step"), m.get("step")) if finite(s)], default=None)
    row.update({
        "id": run.name,
        "name": cfg.get("name") or run.parent.name,
        "status": status,
        "kind": kind,
        "step": step,
        "iters": cfg.get("iters", st.get("iters")),
        "started": started,
        "updated": updated,
        "duration": _duration(st, started, end),
        "host": st.get("host"),
        "error": reason,
        "path": str(run),
    })
    for k in ("epoch", "loss", "contrast_acc", "images_per_s", "data_time_frac", "knn", "knn_top5",
              "knn_last", "knn_init", "online_linear_top1", "metrics_skipped", "metrics_problem"):
        if k in m:
            row[k] = m[k]
    if "lr" in m:
        row["lr_last"] = m["lr"]
    skipped = skipped_files(run, MARKERS)
    if skipped:  # a FIFO, socket or device where a run writes a file: never read (it could block forever)
        row["skipped_files"] = skipped
    row.update(eval_summary(evals, cfg))
    if kind != "pretrain":
        row.update(eval_columns(evals, cfg))
    return row


def _duration(st: dict, started, end) -> Optional[float]:
    """Training time of the whole run: the summed ``train_s`` of all its invocations (plus the time since
    the last heartbeat while it runs); for folders written before ``train_s``, first start to last update."""
    nums = (int, float)
    if isinstance(st.get("train_s"), nums) and not isinstance(st.get("train_s"), bool):
        live = end - st["updated"] if isinstance(end, nums) and isinstance(st.get("updated"), nums) else 0.0
        total = st["train_s"] + max(0.0, live)
    else:
        total = end - started if isinstance(started, nums) and isinstance(end, nums) else None
    return total if total is not None and math.isfinite(total) and total >= 0 else None


def index(root="logs", where: Optional[dict] = None):
    """All runs under ``root`` as a pandas DataFrame, one row per run.

    Columns: every config key (flattened with dots), plus ``id, name, kind`` (pretrain, eval, or
    baseline: an evaluation of a randomly initialised encoder), ``status, step, iters, epoch, loss,
    contrast_acc, lr_last, images_per_s, data_time_frac, knn`` (best kNN top-1 after training; for a
    kNN evaluation its result), ``knn_top5, knn_last, knn_init`` (random-init baseline),
    ``online_linear_top1`` (the online probe's last running top-1, ``--online_probe``), ``linear``
    (best linear top-1 of this run or of eval runs of its checkpoints), ``protocol, eval_top1``
    (an eval run's protocol and result), ``encoder_run`` (the run whose checkpoint it evaluated),
    ``started`` (first start), ``updated`` (datetimes), ``duration`` (Timedelta: training time summed over
    every invocation of a resumed run), ``host, error, path``, ``metrics_skipped, metrics_problem``
    (metrics.jsonl lines or values left out as unusable, and the first), ``skipped_files`` (a FIFO or other
    special file where a run writes one: never read, it could block). On eval rows
    ``arch`` is the encoder's, ``head`` the classifier, ``knn_tau`` the kNN temperature; ``temperature``
    is NT-Xent's only. A run whose process died without a word shows ``status == 'interrupted'``
    with the reason in ``error``.

    ``where``: {column: value} equality filter, e.g. ``{"data": "cifar10"}``.
    """
    import pandas as pd
    now, host = time.time(), socket.gethostname()
    rows = [safe_summarize(p, now, host) for p in find_runs(root)]
    link_evals(rows)
    df = pd.DataFrame.from_records(rows)
    if df.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    for c in SUMMARY_COLUMNS + ["error", "path"]:
        if c not in df.columns:
            df[c] = None
    for c in ("started", "updated"):
        utc = pd.to_datetime(df[c].astype(float), unit="s", utc=True, errors="coerce")
        df[c] = utc.dt.tz_convert(_local_tz()).dt.tz_localize(None)
    df["duration"] = pd.to_timedelta(df["duration"].astype(float).round(), unit="s", errors="coerce")
    for c in ("step", "iters", "batch_size", "loss", "contrast_acc", "knn", "knn_top5", "knn_last", "knn_init",
              "online_linear_top1", "linear", "linear_top5", "eval_top1", "eval_top5", "images_per_s",
              "data_time_frac", "epoch", "lr_last", "temperature", "knn_tau"):
        if c in df.columns:  # inf (a YAML .inf, a hand-edited file) shown as missing, not as a count
            df[c] = pd.to_numeric(df[c], errors="coerce").replace([float("inf"), float("-inf")], float("nan"))
    for c in ("step", "iters", "batch_size"):  # counts stay integers where a row has none (eval rows, kNN)
        vals = df[c].dropna()
        if pd.api.types.is_float_dtype(df[c]) and (vals == vals.round()).all():
            df[c] = df[c].astype("Int64")
    front = [c for c in SUMMARY_COLUMNS + ["knn_init", "knn_last", "online_linear_top1", "epoch", "contrast_acc",
                                           "data_time_frac", "eval_top1", "updated", "host", "error", "path"]
             if c in df.columns]
    df = df[front + sorted(c for c in df.columns if c not in front)]
    if where:
        df = filter_rows(df, where)
    return df.reset_index(drop=True)


def with_links(run, root) -> tuple[dict, list]:
    """(index row, evaluation results) of one run folder, linked as :func:`index` links them.

    The row's ``linear`` counts the eval runs of its checkpoints anywhere under ``root``; the results are
    the run's own ``eval*.json`` followed by those of every eval run of its checkpoints, each of these
    with ``_run`` (the eval run's folder). ``root=None`` or a missing folder: the run alone.
    """
    run = Path(run)
    target = os.path.realpath(run)
    rows = [safe_summarize(p) for p in find_runs(root)] if root is not None and Path(root).is_dir() else []
    if not any(os.path.realpath(r["path"]) == target for r in rows):
        rows.append(summarize(run))
    link_evals(rows)
    row = next(r for r in rows if os.path.realpath(r["path"]) == target)
    evals = read_evals(run)
    for r in rows:
        if r is not row and r.get("encoder_run") and os.path.realpath(r["encoder_run"]) == target:
            evals += [dict(ev, _run=r["path"]) for ev in read_evals(r["path"])]
    return row, evals


def _local_tz():
    return _dt.datetime.now().astimezone().tzinfo


def filter_rows(df, where: dict):
    """Rows where every ``column == value`` (values compared as numbers when both sides are)."""
    mask = None
    for col, want in where.items():
        if col not in df.columns:
            raise UserError(f"unknown column {col!r} in the filter{suggest_column(col, df.columns)}")
        m = df[col].map(lambda v, w=want: _equal(v, w))
        mask = m if mask is None else (mask & m)
    return df[mask] if mask is not None else df


def _equal(v, want) -> bool:
    import pandas as pd
    if v is None or v is pd.NA or (isinstance(v, float) and v != v):
        return str(want).lower() in ("", "none", "nan")
    if isinstance(v, bool):
        return str(want).lower() in (("true", "1", "yes") if v else ("false", "0", "no"))
    if isinstance(v, (int, float)):
        try:
            return float(want) == float(v)
        except (TypeError, ValueError):
            return False
    return str(v) == str(want)


def suggest_column(name: str, columns) -> str:
    import difflib
    close = difflib.get_close_matches(name, [str(c) for c in columns], n=3)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class Index:
    """The spec's ``exman.Index(root).info()`` spelled for this project."""

    def __init__(self, root="logs"):
        self.root = root

    def info(self):
        return index(self.root)

