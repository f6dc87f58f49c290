#!/usr/bin/env python
"""Data-parallel scaling on CPU (gloo): training images/s with 1 process vs N processes.

Runs the real ``simclr pretrain`` command on real CIFAR-10 (DATA_ROOT, default ../shared/data)
three ways, each process pinned to ``--threads`` intra-op threads:
  1 process, the whole global batch;
  N processes via the spec's launch form (``--dist ddp --world_size 1``, N processes on this node);
  1 process with N x threads (what the same cores give without data parallelism).
Throughput is the median ``images_per_s`` of the logged steps after ``--skip`` warm-up steps.
Scaling efficiency = (images/s with N processes) / (N x images/s with 1 process).

    python benchmarks/scaling_cpu.py                 # tiny ResNet-18 (width 16), batch 64, 2 processes
    python benchmarks/scaling_cpu.py --width 64 --batch_size 256 --iters 20
On a GPU machine the same comparison is ``--device cuda`` (processes = GPUs).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, root: Path, procs: int, threads: int, extra: list) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONWARNINGS="ignore::FutureWarning")
    env.setdefault("DATA_ROOT", str((REPO.parent / "shared" / "data").resolve()))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "simclr", "pretrain", "--data", "cifar10", "--arch", "resnet18",
           "--width", str(args.width), "--batch_size", str(args.batch_size), "--iters", str(args.iters),
           "--train_subset", str(args.train_subset), "--test_subset", "100", "--knn_k", "20",
           "--log_freq", "1", "--eval_freq", "0", "--workers", "0", "--seed", "0", "--device", args.device,
           "--root", str(root), "--name", "bench", "--verbose", "false", *extra]
    if procs > 1:
        env["SIMCLR_PROCS_PER_NODE"] = str(procs)
        cmd += ["--dist", "ddp", "--world_size", "1", "--dist_address", f"127.0.0.1:{free_port()}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode:
        sys.exit(f"benchmark run failed:\n{r.stderr[-3000:]}")
    (run_dir,) = [p for p in (root / "bench").iterdir() if p.is_dir()]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ips = [m["images_per_s"] for m in rows if "images_per_s" in m and m["step"] > args.skip]
    return {"processes": procs, "threads_per_process": threads, "images_per_s": statistics.median(ips),
            "steps_timed": len(ips), "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=64, help="global batch (split over the processes)")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the timing")
    ap.add_argument("--train_subset", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no_sync_bn", action="store_true", help="per-process BatchNorm (sync_bn false)")
    args = ap.parse_args()
    extra = ["--sync_bn", "false"] if args.no_sync_bn else []
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (procs, threads) in enumerate([(1, args.threads), (args.procs, args.threads),
                                              (1, args.threads * args.procs)]):
            results.append(run(args, Path(tmp) / str(i), procs, threads, extra))
    one, many, wide = results
    eff = many["images_per_s"] / (args.procs * one["images_per_s"])
    print(f"ResNet-18 width {args.width}, global batch {args.batch_size} x 2 views, {args.device}, "
          f"sync_bn {not args.no_sync_bn}, median of {one['steps_timed']} steps")
    print("| processes x threads | images/s |")
    print("|---|---|")
    for r in results:
        print(f"| {r['processes']} x {r['threads_per_process']} | {r['images_per_s']:.1f} |")
    print(f"scaling efficiency ({args.procs} processes vs 1, same threads each): {100 * eff:.0f}%")
    print(json.dumps({"results": results, "efficiency": eff}))


if __name__ == "__main__":
    main()
