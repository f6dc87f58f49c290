"""Time to accuracy: SimCLR pretraining on CIFAR-10 for a wall-clock budget, then kNN accuracy.

    PYTHONPATH=src python benchmarks/time_to_accuracy.py --arch resnet18 --minutes 10

The clock starts when this script starts (imports, data loading, model building and
``torch.compile`` all count). Training stops at ``--minutes`` minus ``--eval_reserve_s``
(the time kept for the final kNN evaluation); the report gives the wall time from launch to
the printed accuracy, which is the number to compare with the budget. Because the number
of steps is not known in advance, the learning rate follows warm-up + cosine over the
*elapsed fraction of the training budget* (counted from the end of the first, compiling
step) rather than over a step count.

The training step is the fast path's: dataset and augmentation on the device
(``simclr.data.fast``), bf16 autocast, channels_last, ``torch.compile``, multi-tensor LARS,
no host synchronisation except a clock check every ``--sync_every`` steps.
kNN: weighted, k=200, T=0.1 on the encoder output h, the CIFAR-10 test set against the
training set (the protocol of the kNN monitor).
"""
from __future__ import annotations

import time

T_LAUNCH = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--minutes", type=float, required=True, help="wall-clock budget from launch, in minutes")
    p.add_argument("--eval_reserve_s", type=float, default=-1,
                   help="seconds of the budget kept for the final kNN (default: 25 on CUDA, 20%% on CPU)")
    p.add_argument("--data", default="cifar10")
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2.0, help="peak LARS learning rate (2.0 = 1.0 x batch/256)")
    p.add_argument("--warmup_frac", type=float, default=0.03, help="share of the budget spent warming up")
    p.add_argument("--weight_decay", type=float, default=1e-6)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--color_dist_s", type=float, default=0.5)
    p.add_argument("--interpolation", default="auto", choices=["auto", "bilinear", "bicubic"])
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--train_subset", type=int, default=0)
    p.add_argument("--test_subset", type=int, default=0)
    p.add_argument("--knn_k", type=int, default=200)
    p.add_argument("--knn_t", type=float, default=0.1)
    p.add_argument("--sync_every", type=int, default=20, help="steps between clock checks that wait for the GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write the result here too")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from simclr import config as config_lib
    from simclr.data import get_dataset, maybe_subset
    from simclr.data.fast import FastLoader
    from simclr.evaluate import extract_features, knn_classifier
    from simclr.options import PretrainConfig
    from simclr.runtime import resolve_device
    from simclr.train import DivergenceGuard, build, train_step, wrap

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    reserve = args.eval_reserve_s if args.eval_reserve_s >= 0 else (25.0 if cuda else 0.2 * args.minutes * 60)
    deadline = T_LAUNCH + args.minutes * 60 - reserve
    compiled = args.compile == "on" or (args.compile == "auto" and cuda)
    if cuda:
        torch.backends.cudnn.benchmark = True
    cfg = config_lib.build(PretrainConfig, dict(
        arch=args.arch, width=args.width, data=args.data, batch_size=args.batch_size, seed=args.seed,
        temperature=args.temperature, color_dist_s=args.color_dist_s, loader="fast", device=str(device),
        lr=args.lr, weight_decay=args.weight_decay, channels_last=cuda, compile=compiled))
    torch.manual_seed(args.seed)
    pretrain = maybe_subset(get_dataset(args.data, "pretrain"), args.train_subset, 0)
    test = maybe_subset(get_dataset(args.data, "test"), args.test_subset, 0)
    size = pretrain.image_size
    # the training run's own parts and step (multi-tensor LARS, bf16 on CUDA); only the LR clock differs
    parts = build(cfg, pretrain, device, foreach=True,
                  loader=FastLoader(cfg, pretrain, device, interpolation=args.interpolation))
    wrap(parts, cfg, distributed_run=False)
    model, amp, guard = parts.model, parts.amp_dtype, DivergenceGuard("stop", device)
    model.train()

    t_loop = time.perf_counter()
    # the schedule's clock starts after the first step, which compiles: warm-up spent compiling is no warm-up
    t_sched, span = t_loop, max(deadline - t_loop, 1e-3)
    step, first_step_s, loss = 0, None, None
    batches = parts.loader.batches(0, 10 ** 9)
    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        frac = (now - t_sched) / span
        w = args.warmup_frac
        lr = args.lr * (frac / w if frac < w else 0.5 * (1 + math.cos(math.pi * (frac - w) / (1 - w))))
        x, _ = next(batches)
        loss, _, _ = train_step(parts, cfg, x, step, guard, lr=lr)
        step += 1
        if step == 1 or step % args.sync_every == 0:
            if cuda:
                torch.cuda.synchronize(device)
            if step == 1:
                t_sched = time.perf_counter()
                first_step_s = t_sched - t_loop  # compilation and autotuning
                span = max(deadline - t_sched, 1e-3)
    if cuda:
        torch.cuda.synchronize(device)
    batches.close()
    t_trained = time.perf_counter()
    last_loss = float(loss.detach()) if loss is not None else float("nan")

    model.eval()
    train_f, train_y = extract_features(model.convnet, pretrain, size, 1024, 0, device, amp)
    test_f, test_y = extract_features(model.convnet, test, size, 1024, 0, device, amp)
    knn = knn_classifier(train_f, train_y, test_f, test_y, k=args.knn_k, temperature=args.knn_t)
    if cuda:
        torch.cuda.synchronize(device)
    t_done = time.perf_counter()

    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    result = {
        "command": "python benchmarks/time_to_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": name, "torch": torch.__version__,
        "args": vars(args), "knn_top1": knn["top1"], "knn_top5": knn["top5"], "steps": step,
        "epochs": step * args.batch_size / len(pretrain), "images_per_s_incl_compile": step * args.batch_size /
        max(t_trained - t_loop, 1e-9), "setup_s": t_loop - T_LAUNCH, "first_step_s": first_step_s,
        "train_s": t_trained - t_loop, "eval_s": t_done - t_trained, "wall_s_from_launch": t_done - T_LAUNCH,
        "budget_s": args.minutes * 60, "final_loss": last_loss,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None,
    }
    print(f"{args.arch} (width {args.width}) on {args.data}, {name}: kNN top-1 {knn['top1']:.2f}% "
          f"(k={args.knn_k}, T={args.knn_t}) after {step} steps = {result['epochs']:.1f} epochs; "
          f"wall {result['wall_s_from_launch']:.0f} s from launch (budget {result['budget_s']:.0f} s; setup "
          f"{result['setup_s']:.0f} s, first step {first_step_s or 0:.0f} s, eval {result['eval_s']:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
