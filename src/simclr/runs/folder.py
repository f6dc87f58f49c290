"""Reading the files of one run folder, tolerantly: a missing, half-written or unparsable file gives an
empty value, never an exception (a run may be writing while it is read)."""
from __future__ import annotations

import json
import math
import os
import stat
import statistics
from pathlib import Path
from typing import Optional

from ..yamlfile import MAX_CONFIG_BYTES, check_yaml_limits

def _yaml_load(text: str, path: Path):
    import yaml
    # the limits a --config file gets, and no alias at all (a run writes none): a bomb is refused, not expanded
    check_yaml_limits(text, str(path), max_aliases=0)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is ~10x faster on 1,000 runs
    return yaml.load(text, Loader=loader)


MAX_DIGITS = 18  # an integer longer than this in a run's JSON is no step, count or time (and would overflow floats)


def _int(text: str):
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def loads(text):
    """JSON from a run folder: a huge integer makes the document unreadable (None for a file, one line left out
    of metrics.jsonl), never an OverflowError later."""
    return json.loads(text, parse_int=_int)


class NotRegular(OSError):
    """A run-folder file that is a FIFO, socket or device: reading it could block forever, so it is skipped."""


def special_kind(path: Path) -> str:
    """'a FIFO', 'a socket' ... when ``path`` (links followed) is no regular file nor folder, else ''."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return ""
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"


def read_bytes(path: Path, limit: Optional[int] = None) -> bytes:
    """The bytes of a regular file (at most ``limit`` + 1 of them), opened without blocking: a FIFO named
    metrics.jsonl would otherwise block ``simclr runs`` forever (:class:`NotRegular`, an OSError)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegular(f"{path} is no regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read() if limit is None else f.read(limit + 1)
    finally:
        os.close(fd)


def read_json(path: Path):
    """A run folder's JSON file (at most MAX_CONFIG_BYTES), or None when missing, too large, unparsable or no
    regular file."""
    try:
        data = read_bytes(path, MAX_CONFIG_BYTES)
        if len(data) > MAX_CONFIG_BYTES:
            return None
        return loads(data)
    except (OSError, ValueError, RecursionError):
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
    path = Path(run) / "config.yaml"
    try:
        data = read_bytes(path, MAX_CONFIG_BYTES)
        if len(data) > MAX_CONFIG_BYTES:
            return {}
        cfg = _yaml_load(data.decode(errors="replace"), path)
    except OSError:
        return {}
    except Exception:  # a half-written YAML file: yaml raises several error types
        return {}
    return flatten(cfg) if isinstance(cfg, dict) else {}


def skipped_files(run: Path, names) -> str:
    """The files of ``run`` among ``names`` (and its eval*.json) that are no regular file and were skipped:
    ``"metrics.jsonl (a FIFO)"``, or ''."""
    run = Path(run)
    found = [f"{n} ({special_kind(run / n)})" for n in names if special_kind(run / n)]
    found += [f"{p.name} ({special_kind(p)})" for p in sorted(run.glob("eval*.json"))
              if p.name not in names and special_kind(p)]
    return ", ".join(found)


def read_evals(run: Path) -> list:
    """Every ``eval*.json`` of a run folder that parses as a dict (tolerant of missing keys)."""
    out = []
    for p in sorted(Path(run).glob("eval*.json")):
        d = read_json(p)
        if isinstance(d, dict):
            d.setdefault("_file", p.name)
            out.append(d)
    return out


def finite(v) -> bool:
    """A number the tables and figures can use: an int or float (not a bool), neither inf nor NaN."""
    if isinstance(v, int) and not isinstance(v, bool):
        return abs(v) < 10 ** MAX_DIGITS  # math.isfinite(10 ** 400) raises OverflowError
    return isinstance(v, float) and math.isfinite(v)


def parse_record(line, number: int, bad: list) -> Optional[dict]:
    """One metrics.jsonl line as a dict whose numbers are all finite, or None. What is left out (a line
    that is not a JSON object or whose step is not a finite number; a value such as ``1e999``, NaN or a
    string where a number belongs) is described in ``bad`` ("line N: ...")."""
    try:
        rec = loads(line)
    except (ValueError, RecursionError):
        bad.append(f"line {number} is not JSON (half-written or corrupt)")
        return None
    if not isinstance(rec, dict):
        bad.append(f"line {number} is a JSON {type(rec).__name__}, not an object")
        return None
    if "step" in rec and not finite(rec["step"]):  # where it belongs on the step axis is unknown
        bad.append(f"line {number}: step = {str(rec['step'])[:20]!r} is not a finite number")
        return None
    for k, v in list(rec.items()):
        if v is None and k in NUMERIC:  # the writer's null: no finite value at that step (an --on_nan skip)
            del rec[k]
        elif (k in NUMERIC or isinstance(v, float)) and not finite(v):
            bad.append(f"line {number}: {k} = {str(v)[:20]!r} is not a finite number")
            del rec[k]
    return rec


# the values of metrics.jsonl that are numbers (anything else there is a word, e.g. "event": "nan")
NUMERIC = ("step", "epoch", "loss", "contrast_acc", "lr", "images_per_s", "data_time_frac", "nan_skips",
           "skipped_images", "peak_mem_gib", "knn_top1", "knn_top5")


def read_metrics(path: Path, bad: Optional[list] = None) -> list:
    """metrics.jsonl -> list of dicts (see :func:`parse_record`); what was left out is described in ``bad``."""
    out: list = []
    bad = [] if bad is None else bad
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    try:
        text = read_bytes(p).decode(errors="replace")
    except NotRegular:
        bad.append(f"{p.name} is {special_kind(p)}, not a regular file: skipped")
        return out
    except OSError:
        return out
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            rec = parse_record(line, i + 1, bad)
            if rec is not None:
                out.append(rec)
    return out


def metrics_summary(path: Path) -> dict:
    """Summary of metrics.jsonl without parsing every line: the last training record (from the
    end), median throughput of the last 20 training records, the newest online-probe top-1 among them, and
    every kNN record.

    What the summary would read but cannot use (a line that is not a JSON object, a value that is not a
    finite number: see :func:`parse_record`) is left out, counted in ``metrics_skipped`` and described
    in ``metrics_problem``.
    """
    try:
        data = read_bytes(path)
    except OSError:  # missing, or no regular file (said by skipped_files)
        return {}
    lines = data.split(b"\n")
    out: dict = {}
    train: list = []
    bad: list = []
    for i in range(len(lines) - 1, -1, -1):
        if b'"loss"' not in lines[i]:
            continue
        rec = parse_record(lines[i], i + 1, bad)
        if rec is None or not finite(rec.get("step")):
            continue
        train.append(rec)
        if len(train) >= 20:
            break
    if train:
        for k in ("step", "epoch", "loss", "contrast_acc", "lr"):  # each from the last record that has it
            v = next((r[k] for r in train if k in r), None)
            if v is not None:
                out[k] = v
        for k in ("images_per_s", "data_time_frac"):
            vals = [r[k] for r in train if k in r]
            if vals:
                out[k] = statistics.median(vals)
        # the online probe's running top-1 (percent) of the newest line that has one
        probe = next((r["online_linear_top1"] for r in train if isinstance(r.get("online_linear_top1"), (int, float))),
                     None)
        if probe is not None:
            out["online_linear_top1"] = probe
    knn = []
    for i, ln in enumerate(lines):
        if b'"knn_top1"' in ln:
            rec = parse_record(ln, i + 1, bad)
            if rec is not None and "knn_top1" in rec:
                knn.append(rec)
    if bad:
        out["metrics_skipped"], out["metrics_problem"] = len(bad), sorted(bad, key=_line_number)[0]
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


def _line_number(problem: str) -> int:
    return int(problem.split()[1].rstrip(":"))
