"""Reading run folders: the index, one pandas row per run.

A run folder is any folder holding one of :data:`MARKERS` (the layout :mod:`simclr.rundir` writes).
Every reader of a run folder is tolerant: a missing, half-written or unparsable file gives an empty
value and the row says why, never an exception. ``index(root)`` is the public entry point (also reachable as
``simclr.runs.index``); ``Index(root).info()`` is the spec's spelling of it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .status import effective_status

MARKERS = ("status.json", "config.yaml", "metrics.jsonl", "eval.json")
_NOT_RUNS = {"checkpoints", "tb", "report", "features", "__pycache__"}
_MAX_DEPTH = 4

# The columns `simclr runs` shows by default, in this order.
SUMMARY_COLUMNS = ["id", "name", "status", "arch", "data", "batch_size", "step", "iters", "loss", "knn",
                   "linear", "images_per_s", "started", "duration"]


def _yaml_load(text: str):
    import yaml
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is ~10x faster on 1,000 runs
    return yaml.load(text, Loader=loader)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are kept as values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_config(run: Path) -> dict:
    """The run's resolved config (flattened), or {} when missing or unreadable."""
    try:
        cfg = _yaml_load((Path(run) / "config.yaml").read_text())
    except OSError:
        return {}
    except Exception:  # a half-written YAML file: yaml raises several error types
        return {}
    return flatten(cfg) if isinstance(cfg, dict) else {}


def read_evals(run: Path) -> list:
    """Every ``eval*.json`` of a run folder that parses as a dict (tolerant of missing keys)."""
    out = []
    for p in sorted(Path(run).glob("eval*.json")):
        d = read_json(p)
        if isinstance(d, dict):
            d.setdefault("_file", p.name)
            out.append(d)
    return out


def find_runs(root) -> list:
    """Run folders under ``root`` (any folder holding one of MARKERS), sorted by path.

    ``root`` may itself be a run folder. Uses ``os.scandir`` (one system call per folder) so
    that listing thousands of runs stays fast.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"runs folder not found: {root} (pass --root DIR, or set SIMCLR_LOGS)")
    found = []
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        names = {e.name for e in entries}
        if any(m in names for m in MARKERS):
            found.append(folder)
            continue
        if depth < _MAX_DEPTH:
            for e in entries:
                # symlinked run folders are followed; the depth limit keeps a link loop finite
                if e.name not in _NOT_RUNS and not e.name.startswith(".") and e.is_dir():
                    stack.append((Path(e.path), depth + 1))
    return sorted(found)



def read_metrics(path: Path) -> list:
    """metrics.jsonl -> list of dicts; a half-written last line is ignored."""
    out = []
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _metrics_summary(path: Path) -> dict:
    """Summary of metrics.jsonl without parsing every line: the last training record (from the
    end), median throughput of the last 20 training records, and every kNN record.

    Lines that do not parse (a half-written last line) are skipped.
    """
    try:
        data = path.read_bytes()
    except OSError:
        return {}
    lines = data.split(b"\n")
    out: dict = {}
    train: list = []
    for ln in reversed(lines):
        if b'"loss"' not in ln:
            continue
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        train.append(rec)
        if len(train) >= 20:
            break
    if train:
        last = train[0]
        for k in ("step", "epoch", "loss", "contrast_acc", "lr"):
            if isinstance(last.get(k), (int, float)):
                out[k] = last[k]
        for k in ("images_per_s", "data_time_frac"):
            vals = [r[k] for r in train if isinstance(r.get(k), (int, float))]
            if vals:
                out[k] = statistics.median(vals)
    knn = []
    for ln in lines:
        if b'"knn_top1"' in ln:
            try:
                rec = json.loads(ln)
            except ValueError:
                continue
            if isinstance(rec.get("knn_top1"), (int, float)):
                knn.append(rec)
    # step 0 is the random-init baseline (eval_at_start): reported apart, not as the run's best
    init = [r for r in knn if not r.get("step")]
    trained = [r for r in knn if r.get("step")]
    if init:
        out["knn_init"] = init[-1]["knn_top1"]
    if trained:
        best = max(trained, key=lambda r: r["knn_top1"])
        out["knn"] = best["knn_top1"]
        out["knn_top5"] = best.get("knn_top5")
        out["knn_last"] = trained[-1]["knn_top1"]
        out["step"] = max(out.get("step", 0), trained[-1].get("step", 0))
    return out


def _encoder_path(ev: dict, cfg: dict) -> str:
    for src in (ev, ev.get("config") if isinstance(ev.get("config"), dict) else {}, cfg):
        for key in ("encoder_ckpt", "encoder", "encoder_path"):
            v = src.get(key)
            if isinstance(v, dict):
                v = v.get("path")
            if isinstance(v, str) and v:
                return v
    return ""


# eval.json protocols whose top-1 is a linear classifier on frozen features ("eval-only" re-scores a
# saved linear head); fine-tuning ("linear+finetune") and kNN are reported as eval_top1 only.
LINEAR_PROTOCOLS = ("linear", "fast-linear", "eval-only")


def encoder_sha(ev: dict) -> str:
    enc = ev.get("encoder")
    for v in (ev.get("encoder_sha256"), enc.get("sha256") if isinstance(enc, dict) else None):
        if isinstance(v, str) and v:
            return v
    return ""


def _eval_summary(evals: list, cfg: dict) -> dict:
    out: dict = {}
    for ev in evals:
        protocol = str(ev.get("protocol") or cfg.get("protocol") or "eval")
        top1, top5 = ev.get("top1"), ev.get("top5")
        if not isinstance(top1, (int, float)):
            continue
        out.setdefault("protocol", protocol)
        out.setdefault("eval_top1", top1)
        out.setdefault("eval_top5", top5 if isinstance(top5, (int, float)) else None)
        if protocol in LINEAR_PROTOCOLS and top1 >= out.get("linear", float("-inf")):
            out["linear"] = top1
            if isinstance(top5, (int, float)):
                out["linear_top5"] = top5
    enc = _encoder_path(evals[0], cfg) if evals else ""
    if enc:
        out["encoder_ckpt"] = enc
    sha = next((h for h in map(encoder_sha, evals) if h), "")
    if sha:
        out["encoder_sha256"] = sha
    return out


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
    m = _metrics_summary(run / "metrics.jsonl")
    evals = read_evals(run)
    row = dict(cfg)
    started, updated = st.get("started"), st.get("updated")
    if status == "running" and isinstance(started, (int, float)):
        end = time.time() if now is None else now
    else:
        end = updated
    step = max([s for s in (st.get("step"), m.get("step")) if isinstance(s, (int, float))], default=None)
    row.update({
        "id": run.name,
        "name": cfg.get("name") or run.parent.name,
        "status": status,
        "kind": "eval" if (evals or cfg.get("problem") == "eval") else "pretrain",
        "step": step,
        "iters": cfg.get("iters", st.get("iters")),
        "started": started if isinstance(started, (int, float)) else None,
        "updated": updated if isinstance(updated, (int, float)) else None,
        "duration": (end - started) if isinstance(started, (int, float)) and isinstance(end, (int, float))
        else None,
        "host": st.get("host"),
        "error": reason,
        "path": str(run),
    })
    for k in ("epoch", "loss", "contrast_acc", "images_per_s", "data_time_frac", "knn", "knn_top5",
              "knn_last", "knn_init"):
        if k in m:
            row[k] = m[k]
    if "lr" in m:
        row["lr_last"] = m["lr"]
    row.update(_eval_summary(evals, cfg))
    return row


def _link_evals(rows: list) -> None:
    """Give each pretraining row the best linear top-1 among the eval runs of its checkpoints."""
    by_path = {}
    for r in rows:
        by_path[os.path.realpath(r["path"])] = r
    sha_cache: dict = {}
    for r in rows:
        if r["kind"] != "eval" or "linear" not in r:
            continue
        target = None
        enc = r.get("encoder_ckpt")
        if enc:
            p = Path(enc)
            if not p.is_absolute():  # relative to the folder the eval was launched from
                env = read_json(Path(r["path"]) / "env.json")
                p = Path(env.get("cwd") if isinstance(env, dict) and env.get("cwd") else os.getcwd()) / p
            owner = p.parent.parent if p.parent.name == "checkpoints" else None
            target = by_path.get(os.path.realpath(owner)) if owner is not None else None
        if target is None and r.get("encoder_sha256"):
            if not sha_cache:  # checksums of every checkpoint card, read once and only when needed
                for t in rows:
                    for card in Path(t["path"], "checkpoints").glob("*.json"):
                        d = read_json(card)
                        if isinstance(d, dict) and d.get("sha256"):
                            sha_cache[d["sha256"]] = t
            target = sha_cache.get(r["encoder_sha256"])
        if target is not None and target is not r:
            r["encoder_run"] = target["path"]
            if r["linear"] >= target.get("linear", float("-inf")):
                target["linear"] = r["linear"]


def index(root="logs", where: Optional[dict] = None):
    """All runs under ``root`` as a pandas DataFrame, one row per run.

    Columns: every config key (flattened with dots), plus ``id, name, status, kind, step, iters,
    epoch, loss, contrast_acc, lr_last, images_per_s, data_time_frac, knn`` (best kNN top-1 after
    training), ``knn_top5, knn_last, knn_init`` (random-init baseline), ``linear`` (best linear
    top-1 of this run or of eval runs of its checkpoints), ``protocol, eval_top1, started,
    updated`` (datetimes), ``duration`` (Timedelta), ``host, error, path``. A run whose process
    died without a word shows ``status == 'interrupted'`` with the reason in ``error``.

    ``where``: {column: value} equality filter, e.g. ``{"data": "cifar10"}``.
    """
    import pandas as pd
    now, host = time.time(), socket.gethostname()
    rows = [summarize(p, now, host) for p in find_runs(root)]
    _link_evals(rows)
    df = pd.DataFrame.from_records(rows)
    if df.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    for c in SUMMARY_COLUMNS + ["kind", "error", "path"]:
        if c not in df.columns:
            df[c] = None
    for c in ("started", "updated"):
        df[c] = pd.to_datetime(df[c].astype(float), unit="s", utc=True).dt.tz_convert(_local_tz()).dt.tz_localize(None)
    df["duration"] = pd.to_timedelta(df["duration"].astype(float).round(), unit="s")
    for c in ("step", "iters", "loss", "contrast_acc", "knn", "knn_top5", "knn_last", "knn_init", "linear",
              "linear_top5", "eval_top1", "eval_top5", "images_per_s", "data_time_frac", "epoch", "lr_last"):
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    front = [c for c in SUMMARY_COLUMNS + ["kind", "knn_init", "knn_last", "epoch", "contrast_acc",
                                           "data_time_frac", "protocol", "eval_top1", "updated", "host", "error",
                                           "path"] if c in df.columns]
    df = df[front + sorted(c for c in df.columns if c not in front)]
    if where:
        df = filter_rows(df, where)
    return df.reset_index(drop=True)


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
    if v is None or (isinstance(v, float) and v != v):
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

