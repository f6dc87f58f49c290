"""Run folders: one self-describing folder per run.

    <root>/<name>/<run-id>/
        config.yaml      the fully resolved config
        status.json      running | finished | failed | interrupted, pid, host, heartbeat, error
        env.json         package versions, device, git commit, command line
        metrics.jsonl    one JSON object per log/eval event ({"step": ..., "loss": ...})
        log.txt          everything the run printed
        checkpoints/     checkpoint-<step>.pt + .json model cards
        tb/              TensorBoard event files (``tensorboard --logdir <root>``)
        eval*.json       results of evaluation runs (protocol, top-1, top-5, per-class accuracy ...)

Only the main process (rank 0) creates or writes a run folder. While a run is ``running`` a
background thread rewrites ``status.json`` every ``HEARTBEAT_S`` seconds (also during long
evaluations), so a run killed without warning is recognised by :func:`index` as
``interrupted``: its process is gone (same host) or its heartbeat is stale (any host).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .errors import UserError

HEARTBEAT_S = 30.0
# A running run whose status.json is older than this is considered dead (10 missed heartbeats).
STALE_S = 300.0
STATUSES = ("running", "finished", "failed", "interrupted", "unknown")


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}"


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: str = "") -> dict:
    import numpy
    import torch
    import torchvision
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
           "numpy": numpy.__version__, "platform": platform.platform(), "host": socket.gethostname(),
           "device": device, "cuda": torch.version.cuda, "git_commit": _git_commit(),
           "command": " ".join(sys.argv), "cwd": os.getcwd(),
           "data_root": str(Path(os.environ.get("DATA_ROOT", "data")).resolve()),
           "imagenet_path": os.environ.get("IMAGENET_PATH", "")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus_visible"] = torch.cuda.device_count()
    return env


class RunDir:
    """A run folder and its writers (status, metrics, log, TensorBoard)."""

    def __init__(self, path: Path, tensorboard: bool = True):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write the run folder {self.path}: {e.strerror}. Choose a writable --root "
                            f"(or set SIMCLR_LOGS).") from None
        self._tb = None
        self._tb_enabled = tensorboard
        self._last_beat = 0.0
        self._status: dict = {}
        self._lock = threading.Lock()
        self._beat_stop: Optional[threading.Event] = None

    @classmethod
    def create(cls, root: str, name: str, run_dir: str = "") -> "RunDir":
        if run_dir:
            return cls(Path(run_dir))
        return cls(Path(root) / name / new_run_id())

    # --- status -------------------------------------------------------------------------
    def set_status(self, status: str, **extra) -> None:
        with self._lock:
            now = time.time()
            self._status.update({"status": status, "pid": os.getpid(), "host": socket.gethostname(),
                                 "updated": now, **extra})
            self._status.setdefault("started", now)
            self._write_status()
        if status == "running":
            self._start_beating()
        else:
            self._stop_beating()

    def _write_status(self) -> None:
        # caller holds self._lock; the temp name is per thread so two writers never share one
        tmp = self.path / f".status.json.tmp{threading.get_ident()}"
        tmp.write_text(json.dumps(self._status, indent=2, default=str))
        os.replace(tmp, self.path / "status.json")
        self._last_beat = self._status["updated"]

    def heartbeat(self, **extra) -> None:
        if time.time() - self._last_beat >= HEARTBEAT_S:
            self.set_status(self._status.get("status", "running"), **extra)

    def _start_beating(self) -> None:
        """Refresh ``updated`` every HEARTBEAT_S from a daemon thread while the status is running.

        A thread (not the training loop) beats so that a long evaluation or a slow first step is
        not mistaken for a dead run; it dies with the process, which is exactly the signal wanted.
        """
        if self._beat_stop is not None:
            return
        stop = self._beat_stop = threading.Event()

        def beat():
            while not stop.wait(HEARTBEAT_S):
                with self._lock:
                    if stop.is_set() or self._status.get("status") != "running":
                        return
                    self._status["updated"] = time.time()
                    try:
                        self._write_status()
                    except OSError:  # a full or vanished disk must not kill training from a side thread
                        pass

        threading.Thread(target=beat, name="simclr-heartbeat", daemon=True).start()

    def _stop_beating(self) -> None:
        if self._beat_stop is not None:
            self._beat_stop.set()
            self._beat_stop = None

    # --- writers ------------------------------------------------------------------------
    def write_json(self, name: str, obj) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, self.path / name)

    def log_metrics(self, record: dict) -> None:
        # strict JSON: a non-finite value (the loss of a step skipped by --on_nan skip) is written as null
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(clean, default=float, allow_nan=False) + "\n")
        if self._tb_enabled:
            try:
                if self._tb is None:
                    from torch.utils.tensorboard import SummaryWriter
                    # flush every 30 s (default 120) so a live run shows up promptly in TensorBoard
                    self._tb = SummaryWriter(str(self.path / "tb"), flush_secs=30)
                step = int(record.get("step", 0))
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self._tb.add_scalar(k, v, step)
            except ImportError:
                self._tb_enabled = False

    def log(self, msg: str) -> None:
        with open(self.path / "log.txt", "a") as f:
            f.write(msg + "\n")

    def close(self) -> None:
        self._stop_beating()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


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


def find_run_dir(ckpt: Path) -> Optional[Path]:
    """The run folder that holds ``ckpt`` (``<run>/checkpoints/x.pt``), if it is one."""
    p = Path(ckpt).resolve()
    if p.parent.name == "checkpoints" and (p.parent.parent / "config.yaml").exists():
        return p.parent.parent
    return None


# --------------------------------------------------------------------------------------------
# reading run folders: the index
# --------------------------------------------------------------------------------------------
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


def _read_json(path: Path):
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
        d = _read_json(p)
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


def _pid_state(pid: int) -> Optional[str]:
    """'alive', 'dead', or None when it cannot be told. A zombie counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        return "alive"  # someone else's process
    except (OSError, ValueError, OverflowError):
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return "dead"
    except (OSError, IndexError):
        pass
    return "alive"


def _proc_start_time(pid: int) -> Optional[float]:
    """Start time (epoch seconds) of a live process, Linux only; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of the file, counted after "pid (comm)"
        btime = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                     if ln.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def effective_status(st: dict, now: Optional[float] = None, host: Optional[str] = None) -> tuple:
    """(status, reason) of a status.json dict, turning a dead 'running' run into 'interrupted'.

    A run is dead when its process is gone on this host (or the pid now belongs to a process
    started after the run: pid reuse), or when its heartbeat is older than STALE_S on any host.
    """
    status = st.get("status") if isinstance(st.get("status"), str) else "unknown"
    if status not in STATUSES:
        status = "unknown"
    if status != "running":
        return status, str(st.get("error") or "")
    now = time.time() if now is None else now
    host = socket.gethostname() if host is None else host
    pid = st.get("pid")
    if st.get("host") == host and isinstance(pid, int) and pid > 0:
        state = _pid_state(pid)
        if state == "dead":
            return "interrupted", f"process {pid} on {host} is gone (killed without warning?)"
        started = st.get("started")
        t0 = _proc_start_time(pid) if state == "alive" else None
        if t0 is not None and isinstance(started, (int, float)) and t0 > started + 5:
            return "interrupted", f"process {pid} on {host} is gone (the pid now belongs to another process)"
    updated = st.get("updated")
    if isinstance(updated, (int, float)) and now - updated > STALE_S:
        return "interrupted", f"no heartbeat for {(now - updated) / 60:.0f} min (killed without warning?)"
    return "running", ""


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


def _encoder_sha(ev: dict) -> str:
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
    sha = next((h for h in map(_encoder_sha, evals) if h), "")
    if sha:
        out["encoder_sha256"] = sha
    return out


def summarize(run: Path, now: Optional[float] = None, host: Optional[str] = None) -> dict:
    """One index row for a run folder: flattened config, then summary fields on top."""
    run = Path(run)
    cfg = read_config(run)
    st = _read_json(run / "status.json")
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
                env = _read_json(Path(r["path"]) / "env.json")
                p = Path(env.get("cwd") if isinstance(env, dict) and env.get("cwd") else os.getcwd()) / p
            owner = p.parent.parent if p.parent.name == "checkpoints" else None
            target = by_path.get(os.path.realpath(owner)) if owner is not None else None
        if target is None and r.get("encoder_sha256"):
            if not sha_cache:  # checksums of every checkpoint card, read once and only when needed
                for t in rows:
                    for card in Path(t["path"], "checkpoints").glob("*.json"):
                        d = _read_json(card)
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


# --------------------------------------------------------------------------------------------
# `simclr runs`
# --------------------------------------------------------------------------------------------
# Sorting by these puts the largest first (the best run on top); everything else sorts ascending.
_DESCENDING = {"knn", "knn_top5", "knn_last", "linear", "linear_top5", "eval_top1", "contrast_acc",
               "images_per_s", "started", "updated", "step", "duration"}


def _fmt_duration(td) -> str:
    try:
        total = int(td.total_seconds())
    except (AttributeError, ValueError):
        return ""
    h, rem = divmod(total, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def format_table(df, columns: list) -> str:
    """The index as a fixed-width text table (numbers rounded, times to the second)."""
    import pandas as pd
    if df.empty:
        return "(no runs)"
    out = pd.DataFrame(index=df.index)
    for c in columns:
        if c == "steps":
            out[c] = [f"{'' if pd.isna(a) else int(a)}/{'' if pd.isna(b) else int(b)}"
                      for a, b in zip(df["step"], df["iters"])]
            continue
        col = df[c]
        if c == "duration":
            out[c] = [_fmt_duration(v) if not pd.isna(v) else "" for v in col]
        elif c in ("started", "updated"):
            out[c] = [v.strftime("%Y-%m-%d %H:%M") if not pd.isna(v) else "" for v in col]
        elif c == "images_per_s":
            out[c] = [f"{v:.0f}" if not pd.isna(v) else "" for v in col]
        elif pd.api.types.is_float_dtype(col):
            out[c] = [("" if pd.isna(v) else f"{v:.4g}") for v in col]
        else:
            out[c] = ["" if v is None or (isinstance(v, float) and v != v) else str(v) for v in col]
    return out.to_string(index=False)


DEFAULT_TABLE = ["id", "name", "status", "arch", "data", "batch_size", "steps", "loss", "knn", "linear",
                 "images_per_s", "started", "duration"]


def runs_main(argv) -> int:
    import argparse
    from .options import default_root
    ap = argparse.ArgumentParser(prog="simclr runs", description="All runs under a folder as a table, one row "
                                 "per run (status, progress, last loss, best kNN, linear top-1, speed).")
    ap.add_argument("--root", default="", help="folder holding the runs (default: $SIMCLR_LOGS or ./logs)")
    ap.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                    help="keep runs whose column KEY equals VALUE (repeatable), e.g. --where data=cifar10")
    ap.add_argument("--sort", default="", metavar="COLUMN",
                    help="sort by this column; accuracy/speed/time columns put the largest first")
    ap.add_argument("--columns", default="", metavar="A,B,...",
                    help="columns to show (any config key or summary column; 'steps' = done/total)")
    ap.add_argument("--status", default="", help="only runs with this status (running, finished, failed, "
                    "interrupted, unknown)")
    ap.add_argument("--format", default="table", choices=["table", "csv", "json"], help="output format")
    args = ap.parse_args(list(argv))
    where = {}
    for w in args.where:
        if "=" not in w:
            raise UserError(f"--where takes KEY=VALUE, got {w!r}")
        k, v = w.split("=", 1)
        where[k.strip()] = v.strip()
    if args.status:
        where["status"] = args.status
    root = args.root or default_root()
    df = index(root)
    if df.empty:
        print(f"no runs under {root}")
        return 0
    if where:
        df = filter_rows(df, where)
    if args.sort:
        key = args.sort
        if key not in df.columns:
            raise UserError(f"cannot sort by unknown column {key!r}{suggest_column(key, df.columns)}")
        df = df.sort_values(key, ascending=key not in _DESCENDING, na_position="last", kind="stable")
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else DEFAULT_TABLE
    for c in columns:
        if c != "steps" and c not in df.columns:
            raise UserError(f"unknown column {c!r}{suggest_column(c, list(df.columns) + ['steps'])}")
    if args.format == "csv":
        text = df[[c for c in columns if c != "steps"]].to_csv(index=False).rstrip("\n")
    elif args.format == "json":
        text = df[[c for c in columns if c != "steps"]].to_json(orient="records", date_format="iso", indent=1)
    else:
        text = format_table(df, columns)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `simclr runs | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
