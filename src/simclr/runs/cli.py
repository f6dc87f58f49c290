"""``simclr runs``: every run under a folder as a table (or CSV / JSON), one row per run."""
from __future__ import annotations

from dataclasses import dataclass

from .. import config as config_lib
from ..config import option
from ..errors import ConfigError, UserError
from .index import filter_rows, index, suggest_column
from .status import STATUSES

# Sorting by these puts the largest first (the best run on top); everything else sorts ascending.
_DESCENDING = {"knn", "knn_top5", "knn_last", "linear", "linear_top5", "eval_top1", "contrast_acc",
               "images_per_s", "started", "updated", "step", "duration"}

DEFAULT_TABLE = ["id", "name", "status", "arch", "data", "batch_size", "steps", "loss", "knn", "linear",
                 "images_per_s", "started", "duration"]


@dataclass
class RunsOptions:
    """All runs under a folder as a table, one row per run: status, progress, loss, kNN, linear, speed."""

    COMMAND = "runs"
    YAML = False

    root: str = option("", "folder holding the runs (default: $SIMCLR_LOGS or ./logs)")
    where: list = option(help="keep runs whose column KEY equals VALUE, written KEY=VALUE (repeatable), "
                              "e.g. --where data=cifar10", default_factory=list)
    sort: str = option("", "sort by this column; accuracy/speed/time columns put the largest first")
    columns: str = option("", "comma-separated columns to show (any config key or summary column; "
                              "'steps' = done/total)")
    status: str = option("", f"only runs with this status ({', '.join(STATUSES)})",
                         check=lambda s: s in ("",) + STATUSES, check_msg=f"allowed: {', '.join(STATUSES)}")
    format: str = option("table", "output format", ["table", "csv", "json"])

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


def runs_main(argv) -> int:
    from ..options import default_root
    args, _ = config_lib.parse(RunsOptions, argv)
    where = {}
    for w in args.where:
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
    print(text, flush=True)  # a closed pipe (`simclr runs | head`) is the entry point's to handle
    return 0
