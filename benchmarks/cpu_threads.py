#!/usr/bin/env python
"""How to share a CPU's cores between the training step and the fast path's background augmentation thread.

The fast input path on a CPU (``--loader fast``, the default there for in-memory data on a CPU with native bf16)
builds step s+1's views in a background thread (one OpenMP thread) while step s runs on torch's intra-op
threads. This script trains the same model on the same batches in several splits, in interleaved rounds (one
split after the other, ``--rounds`` times), and prints the median training images/s of each:

  threads T + prefetch: the step on T intra-op threads, augmentation in the background thread;
  threads T, inline:    the step on T threads, the augmentation in the same thread before each step.

    python benchmarks/cpu_threads.py                          # ResNet-18 width 16, batch 128, 32 px
    python benchmarks/cpu_threads.py --width 8 --steps 3 --rounds 1   # a smoke run

The precision and layout are the project's CPU defaults (``--precision auto``); the figures are CPU-relative
(ratios between splits measured side by side), not GPU numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per split and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train_subset", type=int, default=5000)
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()

    from simclr import config as config_lib
    from simclr.data import get_dataset, maybe_subset
    from simclr.options import PretrainConfig
    from simclr.runtime import describe_compute
    from simclr.train import build, train_step

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    splits = [(t, pre) for t in sorted({1, max(1, cpus - 1), cpus}) for pre in (True, False)]
    cfg = config_lib.build(PretrainConfig, dict(data="cifar10", arch="resnet18", width=args.width,
                                                batch_size=args.batch_size, iters=10 ** 6, lr=0.1, seed=0,
                                                device="cpu", loader="fast", workers=0))
    images = maybe_subset(get_dataset("cifar10", "pretrain", "", 0), args.train_subset, 0)
    parts = build(cfg, images, torch.device("cpu"))
    parts.model.train()
    print(f"{cpus} usable CPUs; resnet18 width {args.width}, batch {args.batch_size} x 2 views; "
          f"{describe_compute(parts.amp_dtype, parts.channels_last, torch.device('cpu'))}", flush=True)
    rates: dict = {s: [] for s in splits}
    step = 0
    for r in range(args.rounds):
        for threads, prefetch in splits:
            torch.set_num_threads(threads)
            parts.loader.prefetch = prefetch
            batches = parts.loader.batches(step, step + args.steps + 1)
            x, _ = next(batches)  # the first batch is not overlapped with a step: untimed
            train_step(parts, x, step)
            t0 = time.perf_counter()
            for x, _ in batches:
                loss, _, _ = train_step(parts, x, step)
            float(loss)
            rates[(threads, prefetch)].append(args.steps * args.batch_size / (time.perf_counter() - t0))
            step += args.steps + 1
            print(f"round {r + 1}: {threads} thread(s), {'prefetch' if prefetch else 'inline'}: "
                  f"{rates[(threads, prefetch)][-1]:.1f} img/s", flush=True)
    print("\nmedian images/s per split:")
    out = []
    for (threads, prefetch), v in rates.items():
        med = statistics.median(v)
        out.append({"threads": threads, "prefetch": prefetch, "images_per_s": med, "runs": v})
        print(f"  {threads} intra-op thread(s) + {'background augmentation thread' if prefetch else 'inline aug':<31}"
              f" {med:7.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpus": cpus, "args": vars(args), "results": out}, f, indent=2)


if __name__ == "__main__":
    main()
