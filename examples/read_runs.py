"""Read every run under a folder into a pandas DataFrame, filter it, and plot it.

    python examples/read_runs.py                      # runs under ./logs (or $SIMCLR_LOGS) -> logs/runs.png
    python examples/read_runs.py --root logs --out /tmp/runs.png

This replaces the spec's read_logs notebook: `simclr.runs.index(root)` gives one row per run
with every config key as a column, plus summary columns (status, step, loss, knn = best kNN
top-1, linear = linear-evaluation top-1, images_per_s, started, duration, path ...).
"""
import argparse
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import simclr
from simclr.options import default_root


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=default_root(), help="folder holding the runs")
    ap.add_argument("--out", default="", help="where to save the figure (default: runs.png inside --root)")
    args = ap.parse_args()
    out = Path(args.out) if args.out else Path(args.root) / "runs.png"  # next to the runs, not in the clone

    df = simclr.runs.index(args.root)
    print(f"{len(df)} runs under {args.root}; statuses: {df.status.value_counts().to_dict()}")

    # filter like any DataFrame: pretraining runs that got to the end
    done = df[(df.kind == "pretrain") & (df.status == "finished")]
    print(done[["id", "name", "arch", "batch_size", "temperature", "step", "loss", "knn", "linear"]]
          .to_string(index=False))

    # one question answered per line: best kNN accuracy for each temperature
    if len(done):
        print(done.groupby("temperature").knn.max())

    # the curves of each run come from its metrics.jsonl
    fig = Figure(figsize=(10, 3.5))
    FigureCanvasAgg(fig)
    ax_loss, ax_knn = fig.subplots(1, 2)
    for _, run in df[df.kind == "pretrain"].iterrows():
        recs = simclr.runs.read_metrics(run.path)
        train = [r for r in recs if "loss" in r]
        knn = [r for r in recs if "knn_top1" in r]
        label = f"{run['name']}/{run['id']}"
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
        ax_knn.plot([r["epoch"] for r in knn], [r["knn_top1"] for r in knn], "o-", label=label)
    ax_loss.set(xlabel="step", ylabel="loss")
    ax_knn.set(xlabel="epoch", ylabel="kNN top-1 (%)")
    ax_knn.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
