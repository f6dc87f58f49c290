"""``simclr report RUN`` and ``simclr compare RUN_A RUN_B ...``: option schemas and the two commands."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .. import config as config_lib
from ..config import nonneg, option
from ..errors import ConfigError, UserError
from ..runs import MARKERS


@dataclass
class ReportOptions:
    """Write report.html (+ PNGs in report/) into a run folder: curves, views, neighbours, embedding, confusion."""

    COMMAND = "report"
    YAML = False

    run: str = option(dataclasses.MISSING, "run folder (logs/<name>/<run-id>) or a run id under the runs root",
                      positional=True)
    out: str = option("", "folder to write into (default: the run folder)")
    no_pictures: bool = option(False, "skip views/retrieval/embedding (no dataset needed)")
    queries: int = option(0, "retrieval queries, one per class (0 = every class, at most 100)", check=nonneg,
                          check_msg="must be >= 0")
    gallery: int = option(0, "training images searched for neighbours (0: 1000; 300 for images > 64 px)",
                          check=nonneg, check_msg="must be >= 0")
    embed: int = option(0, "test images in the embedding plot (0: 500; 300 for images > 64 px)", check=nonneg,
                        check_msg="must be >= 0")
    device: str = option("cpu", "device for feature extraction (cpu, cuda)")
    data_root: str = option("", "folder holding the datasets (default: $DATA_ROOT, else the one the run read)")
    root: str = option("", "folder of runs searched for evaluations of this run's checkpoints, shown beside its own "
                           "(default: $SIMCLR_LOGS or ./logs)")
    force: bool = option(False, "overwrite a report.html and pictures in --out that simclr report did not write")


@dataclass
class CompareOptions:
    """Plot two or more runs on shared axes and list the config keys whose values differ."""

    COMMAND = "compare"
    YAML = False

    runs: list = option(dataclasses.MISSING, "run folders (or run ids under the runs root), at least two",
                        positional=True)
    out: str = option("", "figure to write (default: compare.png inside the first run's folder)")
    json: bool = option(False, "print the differences as JSON")
    force: bool = option(False, "overwrite --out even when it is a file compare did not write")

    def check(self) -> None:
        if len(self.runs) < 2:
            raise ConfigError("compare needs at least two run folders")


def resolve_run(arg: str) -> Path:
    """A run folder given as a path, or as a run id found under the default runs root."""
    p = Path(arg)
    if p.is_dir():
        if not any((p / m).exists() for m in MARKERS):
            raise UserError(f"{p} is not a run folder (it holds none of {', '.join(MARKERS)})")
        return p
    from ..options import default_root
    root = Path(default_root())
    hits = sorted(root.glob(f"*/{p.name}")) if root.is_dir() and p.name == arg else []
    hits = [h for h in hits if h.is_dir()]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise UserError(f"run id {arg!r} matches several folders: {', '.join(map(str, hits))}; pass the path")
    raise UserError(f"run folder not found: {arg} (pass logs/<name>/<run-id>; `simclr runs` lists them)")


def report_main(argv) -> int:
    from .page import write_report
    args, _ = config_lib.parse(ReportOptions, argv)
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UserError("--device cuda was requested but CUDA is not available; use --device cpu")
    from ..options import default_root
    run = resolve_run(args.run)
    page = write_report(run, Path(args.out) if args.out else None, pictures=not args.no_pictures,
                        n_queries=args.queries, gallery=args.gallery, n_embed=args.embed, device=args.device,
                        data_root=args.data_root or None, runs_root=args.root or default_root(), force=args.force)
    print(f"report: {page}")
    return 0


def compare_main(argv) -> int:
    from ..files import claim_output
    from .plots import PNG_MARK, compare
    args, _ = config_lib.parse(CompareOptions, argv)
    runs = [resolve_run(r) for r in args.runs]
    out = Path(args.out) if args.out else runs[0] / "compare.png"
    claim_output(out, PNG_MARK.encode(), "compare", args.force)  # never over a checkpoint or a user's picture
    diff, png = compare(runs, out)
    from ..runs import read_config
    from .plots import config_diff
    other = config_diff([read_config(r) for r in runs], bookkeeping=True)
    if args.json:
        print(json.dumps({"runs": [str(r) for r in runs], "differences": diff, "bookkeeping": other,
                          "figure": str(png)}, indent=1, default=str))
        return 0
    if diff:
        import pandas as pd
        table = pd.DataFrame({f"[{i + 1}]": [str(v[i]) for v in diff.values()] for i in range(len(runs))},
                             index=list(diff))
        print("config keys that differ:")
        print(table.to_string())
    else:
        print("the configs are identical")
    if other:
        print(f"also different, not counted (where and how they ran): {', '.join(other)}")
    for i, r in enumerate(runs):
        print(f"[{i + 1}] {r}")
    print(f"figure: {png}")
    return 0
