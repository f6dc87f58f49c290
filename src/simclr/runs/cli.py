"""``simclr runs``: every run under a folder as a table (or CSV / JSON), one row per run."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from .. import config as config_lib
from ..config import option
from ..errors import ConfigError, UserError
from ..progress import printable, rate
from .index import filter_rows, index, suggest_column
from .status import STATUSES

# Sorting by these puts the largest first (the best run on top); everything else sorts ascending.
_DESCENDING = {"knn", "knn_top5", "knn_last", "online_linear_top1", "linear", "linear_top5", "eval_top1",
               "contrast_acc", "images_per_s", "started", "updated", "step", "duration"}

DEFAULT_TABLE = ["id", "name", "kind", "status", "arch", "data", "batch_size", "steps", "loss", "knn", "linear",
                 "protocol", "images_per_s", "started", "duration"]
KINDS = ("all", "pretrain", "eval", "baseline")


@dataclass
class RunsOptions:
    """All runs under a folder as a table, one row per run: status, progress, loss, kNN, linear, speed."""

    COMMAND = "runs"
    YAML = False

    root: str = option("", "folder holding the runs (default: $SIMCLR_LOGS or ./logs)")
    where: list = option(help="keep runs whose column KEY equals VALUE, written KEY=VALUE (repeatable), "
                              "e.g. --where data=cifar10", default_factory=list)
    kind: str = option("all", "only runs of this kind: pretrain, eval, baseline (an evaluation of a randomly "
                              "initialised encoder), or all", KINDS)
    sort: str = option("", "sort by this column (default: newest first); accuracy/speed/time columns put the "
                           "largest first")
    columns: str = option("", "comma-separated columns to show (any config key or summary column; "
                              "'steps' = done/total)")
    status: str = option("", f"only runs with this status ({', '.join(STATUSES)})",
                         check=lambda s: s in ("",) + STATUSES, check_msg=f"allowed: {', '.join(STATUSES)}")
    format: str = option("table", "output format; csv and json give plain numbers (duration in seconds, "
                                  "accuracies in percent) and ISO times", ["table", "csv", "json"])

    def check(self) -> None:
        for w in self.where:
            if "=" not in w:
                raise ConfigError(f"--where takes KEY=VALUE, got {config_lib.shown(w)}")


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
            def count(v):
                return "" if pd.isna(v) else str(int(v))
            # ?/300: the total is known, the steps done are not (an eval run logs none until it ends)
            out[c] = ["" if pd.isna(a) and pd.isna(b) else f"{count(a) or '?'}/{count(b)}" if not pd.isna(b)
                      else count(a) for a, b in zip(df["step"], df["iters"])]
            continue
        col = df[c]
        if c == "duration":
            out[c] = [_fmt_duration(v) if not pd.isna(v) else "" for v in col]
        elif c in ("started", "updated"):
            out[c] = [v.strftime("%Y-%m-%d %H:%M") if not pd.isna(v) else "" for v in col]
        elif c == "images_per_s":
            out[c] = [rate(v) if not pd.isna(v) else "" for v in col]
        elif pd.api.types.is_float_dtype(col):
            out[c] = [("" if pd.isna(v) else f"{v:.4g}") for v in col]
        else:
            out[c] = ["" if v is None or (pd.api.types.is_scalar(v) and pd.isna(v)) else str(v) for v in col]
    return out.to_string(index=False)


def machine_format(df, fmt: str) -> str:
    """CSV or JSON with plain values: durations in seconds (not ``0 days 00:00:03``), times in ISO 8601."""
    import pandas as pd
    df = df.copy()
    for c in df.columns:
        if pd.api.types.is_timedelta64_dtype(df[c]):
            df[c] = df[c].dt.total_seconds()
    if fmt == "csv":
        return df.to_csv(index=False, date_format="%Y-%m-%dT%H:%M:%S").rstrip("\n")
    return df.to_json(orient="records", date_format="iso", indent=1)


def runs_main(argv) -> int:
    from ..options import default_root
    args, _ = config_lib.parse(RunsOptions, argv)
    where = {}
    for w in args.where:
        k, v = w.split("=", 1)
        where[k.strip()] = v.strip()
    if args.status:
        where["status"] = args.status
    if args.kind != "all":
        where["kind"] = args.kind
    root = args.root or default_root()
    df = index(root)
    if df.empty:
        print(f"no runs under {root}")
        return 0
    for _, row in df[df["metrics_skipped"].fillna(0) > 0].iterrows() if "metrics_skipped" in df else ():
        print(printable(f"warning: {row['path']}/metrics.jsonl: skipped {int(row['metrics_skipped'])} unreadable "
                        f"line(s) or value(s), e.g. {row['metrics_problem']}"), file=sys.stderr, flush=True)
    for _, row in df[df["skipped_files"].notna()].iterrows() if "skipped_files" in df else ():
        print(printable(f"note: {row['path']}: skipped {row['skipped_files']}: not a regular file, never read"),
              file=sys.stderr, flush=True)
    if where:
        df = filter_rows(df, where)
    key = args.sort or "started"
    if key not in df.columns:
        raise UserError(f"cannot sort by unknown column {key!r}{suggest_column(key, df.columns)}")
    df = df.sort_values(key, ascending=key not in _DESCENDING, na_position="last", kind="stable")
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else DEFAULT_TABLE
    for c in columns:
        if c != "steps" and c not in df.columns:
            raise UserError(f"unknown column {c!r}{suggest_column(c, list(df.columns) + ['steps'])}")
    if args.format in ("csv", "json"):
        plain = []  # 'steps' (done/total) as its two numbers
        for c in columns:
            plain += [k for k in (("step", "iters") if c == "steps" else (c,)) if k not in plain]
        text = machine_format(df[plain], args.format)
    else:
        text = printable(format_table(df, columns))  # run and class names from folder names, as text
    print(text, flush=True)  # a closed pipe (`simclr runs | head`) is the entry point's to handle
    return 0
