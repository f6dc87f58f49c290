#!/usr/bin/env python
"""Precision and memory layout of one training step on a CPU, the variants interleaved in one process.

One ResNet-18 step (CIFAR stem, ``--width``, batch ``--batch_size`` x 2 views, 32 px, forward + backward + NT-Xent
in fp32) four ways: fp32 NCHW (the spec's), bf16 autocast NCHW, fp32 channels_last, bf16 autocast + channels_last
(the project's default on a CPU with native bf16). Each round runs every variant once (``--steps`` steps, after
one untimed warm-up round); the median seconds per step over ``--rounds`` rounds are printed.

    python benchmarks/cpu_precision.py                # width 16, batch 128, the process's thread count
    python benchmarks/cpu_precision.py --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from simclr import config as config_lib
    from simclr.loss import nt_xent
    from simclr.models import build_model
    from simclr.options import PretrainConfig
    from simclr.runtime import cpu_native_bf16

    cfg = config_lib.build(PretrainConfig, dict(arch="resnet18", width=args.width, data="cifar10",
                                                batch_size=args.batch_size))
    x = torch.rand(2 * args.batch_size, 3, 32, 32)
    variants = [("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)]
    models = {}
    for precision, cl in variants:
        torch.manual_seed(0)
        m = build_model(cfg, 32)
        models[(precision, cl)] = m.to(memory_format=torch.channels_last) if cl else m
    times: dict = {v: [] for v in variants}
    for r in range(args.rounds + 1):
        for precision, cl in variants:
            m = models[(precision, cl)]
            xx = x.contiguous(memory_format=torch.channels_last) if cl else x
            t = time.perf_counter()
            for _ in range(args.steps):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = m(xx)
                loss, _ = nt_xent(out["z"].float(), 0.5, 2)
                loss.backward()
            if r:  # round 0 warms up
                times[(precision, cl)].append((time.perf_counter() - t) / args.steps)
    native = cpu_native_bf16() or "none"
    print(f"resnet18 width {args.width}, batch {args.batch_size} x 2 views, {torch.get_num_threads()} threads, "
          f"native bf16: {native}, torch {torch.__version__}")
    base = statistics.median(times[("fp32", False)])
    for (precision, cl), v in times.items():
        med = statistics.median(v)
        print(f"  {precision}, {'channels_last' if cl else 'NCHW':<13} {med:6.3f} s/step  ({base / med:.2f}x)")


if __name__ == "__main__":
    main()
