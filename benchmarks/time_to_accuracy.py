"""Time to accuracy: SimCLR pretraining on CIFAR-10 for a wall-clock budget, then kNN accuracy.

    PYTHONPATH=src python benchmarks/time_to_accuracy.py --arch resnet18 --minutes 10

The clock starts when this script starts (imports, data loading, model building and
``torch.compile`` all count). Training stops at ``--minutes`` minus ``--eval_reserve_s``
(the time kept for the final kNN evaluation); the report gives the wall time from launch to
the printed accuracy, which is the number to compare with the budget. Because the number
of steps is not known in advance, the learning rate follows warm-up + cosine over the
*elapsed fraction of the training budget* (counted from the end of the first, compiling
step) rather than over a step count.

``--curve_points N`` evaluates the kNN N-1 times during training as well (at 1/N, 2/N ...
of the training time), so one run gives the accuracy-over-time curve: each point has the wall
time from launch without the earlier points' evaluations (what a run stopped there would have
taken) and the JSON's ``minutes_to_knn`` reads "X% kNN within N minutes" off it. The
evaluations count against the budget (the run trains that much less).

The script prints a timestamped line before every phase that can take more than a few
seconds. On a CPU it first times a few feature batches and refuses (before training) a
budget that the final kNN alone would exceed. Ctrl-C stops it with one line and exit 130.

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

KNN_THRESHOLDS = (50, 60, 70, 80, 85, 90)
PROGRESS_S = 10.0  # at most this long without a printed line while training


class BudgetError(Exception):
    """The budget cannot hold what the run needs (printed as one ``error:`` line, exit 1)."""


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--minutes", type=float, required=True, help="wall-clock budget from launch, in minutes")
    p.add_argument("--eval_reserve_s", type=float, default=-1,
                   help="seconds of the budget kept for the final kNN (default: 25 on CUDA; on a CPU 20%% of the "
                        "budget, or more when the timed feature batches say the kNN needs more)")
    p.add_argument("--curve_points", type=int, default=1,
                   help="kNN evaluations in all, the last at the end (1 = only the final one)")
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
    p.add_argument("--sync_every", type=int, default=0,
                   help="steps between clock checks that wait for the GPU (0 = 20 on CUDA, 1 elsewhere)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write the result here too")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.curve_points < 1 or args.sync_every < 0:
        p.error("--minutes must be > 0, --curve_points >= 1 and --sync_every >= 0")
    return args


def lr_at(frac: float, peak: float, warmup_frac: float) -> float:
    """Warm-up + cosine over the elapsed fraction of the training time."""
    frac = min(max(frac, 0.0), 1.0)
    if frac < warmup_frac:
        return peak * frac / warmup_frac
    return peak * 0.5 * (1 + math.cos(math.pi * (frac - warmup_frac) / (1 - warmup_frac)))


def train_for_budget(do_step, clock, deadline: float, *, sync=lambda: None, sync_every: int = 20,
                     curve_points: int = 1, evaluate=None, say=print, progress_s: float = PROGRESS_S) -> dict:
    """Call ``do_step(step, frac)`` (frac: elapsed share of the training time, for the schedule) until ``clock()``
    reaches ``deadline``. The clock is read before every step (on a GPU it only advances at the ``sync()`` every
    ``sync_every`` steps: the host runs ahead of the device in between). With ``curve_points`` > 1, ``evaluate()``
    runs at 1/N, 2/N ... of the training time; its time is taken off the schedule's span, so the learning rate
    still reaches its end at the deadline.

    Returns start and end (the clock), steps, first_step_s (the compiling first step), train_s (excluding
    evaluations), paused_s (the evaluations) and points: [{step, train_s, paused_before_s, eval_s, knn_top1,
    at}], ``at`` the clock after the evaluation."""
    t_loop = clock()
    t_sched, span = t_loop, max(deadline - t_loop, 1e-3)
    step, first_step_s, paused, points = 0, None, 0.0, []
    marks: list = []
    last_say = t_loop
    while clock() < deadline:
        now = clock()
        do_step(step, (now - t_sched - paused) / span)
        step += 1
        if step != 1 and step % sync_every:
            continue
        sync()
        now = clock()
        if step == 1:
            t_sched, first_step_s = now, now - t_loop
            span = max(deadline - t_sched, 1e-3)
            marks = [span * k / curve_points for k in range(1, curve_points)]
            say(f"first step done after {first_step_s:.1f} s (compilation, autotuning); training for "
                f"{max(deadline - now, 0):.0f} s more")
            last_say = now
            continue
        trained = now - t_sched - paused
        if now - last_say >= progress_s:
            say(f"step {step}, {trained:.0f} s of training, {max(deadline - now, 0):.0f} s left")
            last_say = now
        if marks and evaluate is not None and trained >= marks[0] and now < deadline:
            marks.pop(0)
            say(f"curve point {len(points) + 1}/{curve_points}: kNN after {step} steps")
            t0 = clock()
            top1 = evaluate()
            t1 = clock()
            points.append({"step": step, "train_s": trained, "paused_before_s": paused, "eval_s": t1 - t0,
                           "knn_top1": top1, "at": t1})
            say(f"curve point {len(points)}/{curve_points}: kNN top-1 {top1:.2f}% ({t1 - t0:.1f} s)")
            paused += t1 - t0
            span = max(span - (t1 - t0), 1e-3)
            last_say = t1
    sync()
    end = clock()
    return {"steps": step, "first_step_s": first_step_s, "paused_s": paused, "start": t_loop,
            "train_s": max(end - t_sched - paused, 0.0) if step else 0.0, "points": points, "end": end}


def minutes_to(points: list, thresholds=KNN_THRESHOLDS) -> dict:
    """For each kNN threshold (percent): the minutes from launch, without earlier curve evaluations, of the first
    point at or above it (None when no point reached it). Points carry ``wall_s_excl_curve``."""
    out = {}
    for th in thresholds:
        hit = next((p for p in points if p["knn_top1"] >= th), None)
        out[str(th)] = round(hit["wall_s_excl_curve"] / 60, 3) if hit else None
    return out


def main(argv=None, clock=time.perf_counter, t_launch=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    t_launch = T_LAUNCH if t_launch is None else t_launch
    args = parse(argv)
    state = {"steps": 0}

    def say(msg: str) -> None:
        print(f"[tta +{clock() - t_launch:.0f}s] {msg}", flush=True)

    try:
        return run(args, argv, clock, t_launch, say, state)
    except KeyboardInterrupt:
        print(f"time_to_accuracy: interrupted (Ctrl-C) after {clock() - t_launch:.0f} s; no result written",
              file=sys.stderr, flush=True)
        return 130
    except BudgetError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1


def run(args, argv, clock, t_launch, say, state) -> int:
    say(f"importing torch and the package (budget {args.minutes * 60:.0f} s from launch)")
    import torch
    from simclr import config as config_lib
    from simclr.data import get_dataset, maybe_subset
    from simclr.data.fast import FastLoader
    from simclr.evaluate import extract_features, knn_classifier
    from simclr.options import PretrainConfig
    from simclr.runtime import resolve_device
    from simclr.train import build, train_step, wrap

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    budget = args.minutes * 60
    compiled = args.compile == "on" or (args.compile == "auto" and cuda)
    if cuda:
        torch.backends.cudnn.benchmark = True
    cfg = config_lib.build(PretrainConfig, dict(
        arch=args.arch, width=args.width, data=args.data, batch_size=args.batch_size, seed=args.seed,
        temperature=args.temperature, color_dist_s=args.color_dist_s, loader="fast", device=str(device),
        lr=args.lr, weight_decay=args.weight_decay, channels_last=cuda, compile=compiled))
    torch.manual_seed(args.seed)
    say(f"loading {args.data}")
    pretrain = maybe_subset(get_dataset(args.data, "pretrain"), args.train_subset, 0)
    test = maybe_subset(get_dataset(args.data, "test"), args.test_subset, 0)
    size = pretrain.image_size
    say(f"building {args.arch} (width {args.width}) on {device}{', compiled at the first step' if compiled else ''}")
    # the training run's own parts and step (multi-tensor LARS, bf16 on CUDA); only the LR clock differs
    parts = build(cfg, pretrain, device, foreach=True,
                  loader=FastLoader(cfg, pretrain, device, interpolation=args.interpolation))
    wrap(parts, distributed_run=False)
    model, amp = parts.model, parts.amp_dtype

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def knn_top1() -> float:
        model.eval()
        train_f, train_y = extract_features(model.convnet, pretrain, size, 1024, 0, device, amp)
        test_f, test_y = extract_features(model.convnet, test, size, 1024, 0, device, amp)
        knn = knn_classifier(train_f, train_y, test_f, test_y, k=args.knn_k, temperature=args.knn_t)
        sync()
        model.train()
        return float(knn["top1"])

    reserve = args.eval_reserve_s
    if reserve < 0:
        reserve = 25.0 if cuda else 0.2 * budget
        if not cuda:  # time a few feature batches: a full CIFAR kNN on a CPU takes minutes, not seconds
            probe = pretrain.subset(range(min(256, len(pretrain))))
            say(f"timing the kNN's feature extraction ({len(probe)} images)")
            model.eval()
            t0 = clock()
            extract_features(model.convnet, probe, size, 256, 0, device, amp)
            est = (clock() - t0) * (len(pretrain) + len(test)) / len(probe)
            model.train()
            reserve = max(reserve, 1.25 * est)
            left = budget - (clock() - t_launch)
            if args.curve_points * 1.25 * est >= left:
                raise BudgetError(
                    f"the kNN evaluation{'s' if args.curve_points > 1 else ''} alone would take about "
                    f"{args.curve_points * est:.0f} s on this {device} ({len(pretrain)} + {len(test)} images), and "
                    f"{left:.0f} s of the {budget:.0f} s budget are left; use --train_subset/--test_subset (e.g. "
                    f"5000/1000), fewer --curve_points, or more --minutes")
    deadline = t_launch + budget - reserve
    if clock() >= deadline:
        raise BudgetError(f"setup took {clock() - t_launch:.0f} s: no training time is left in the {budget:.0f} s "
                          f"budget (minus {reserve:.0f} s kept for the final kNN); give more --minutes")
    model.train()
    batches = parts.loader.batches(0, 10 ** 9)
    last = {"loss": None}

    def do_step(step: int, frac: float) -> None:
        x, _ = next(batches)
        last["loss"], _, _ = train_step(parts, x, step, lr=lr_at(frac, args.lr, args.warmup_frac))
        state["steps"] = step + 1

    say(f"training until +{deadline - t_launch:.0f} s (first step: compilation and autotuning)")
    try:
        tr = train_for_budget(do_step, clock, deadline, sync=sync, sync_every=args.sync_every or (20 if cuda else 1),
                              curve_points=args.curve_points, evaluate=knn_top1, say=say)
    finally:
        batches.close()
    step, t_trained = tr["steps"], tr["end"]
    if step == 0:
        raise BudgetError(f"no training step fit in the budget (setup took {t_trained - t_launch:.0f} s of "
                          f"{budget:.0f} s); give more --minutes")
    last_loss = float(last["loss"].detach())

    say(f"final kNN over {len(pretrain)} + {len(test)} images")
    top1 = knn_top1()
    t_done = clock()
    points = tr["points"] + [{"step": step, "train_s": tr["train_s"], "paused_before_s": tr["paused_s"],
                              "eval_s": t_done - t_trained, "knn_top1": top1, "at": t_done}]
    for p in points:  # what a run stopped at that point would have taken: without the earlier curve evaluations
        at = p.pop("at")
        p["wall_s"] = at - t_launch
        p["wall_s_excl_curve"] = at - t_launch - p["paused_before_s"]

    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    wall = t_done - t_launch
    result = {
        "command": "python benchmarks/time_to_accuracy.py " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": name, "torch": torch.__version__,
        "args": vars(args), "knn_top1": top1, "steps": step,
        "epochs": step * args.batch_size / len(pretrain),
        "images_per_s_incl_compile": step * args.batch_size / max(tr["train_s"] + (tr["first_step_s"] or 0), 1e-9),
        "setup_s": tr["start"] - t_launch,
        "first_step_s": tr["first_step_s"], "train_s": tr["train_s"], "curve_eval_s": tr["paused_s"],
        "eval_s": t_done - t_trained, "wall_s_from_launch": wall, "budget_s": budget, "eval_reserve_s": reserve,
        "within_budget": wall <= budget, "final_loss": last_loss, "curve": points,
        "minutes_to_knn": minutes_to(points),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None,
    }
    print(f"{args.arch} (width {args.width}) on {args.data}, {name}: kNN top-1 {top1:.2f}% "
          f"(k={args.knn_k}, T={args.knn_t}) after {step} steps = {result['epochs']:.1f} epochs; "
          f"wall {wall:.0f} s from launch (budget {budget:.0f} s; setup {result['setup_s']:.0f} s, first step "
          f"{tr['first_step_s'] or 0:.0f} s, curve evaluations {tr['paused_s']:.0f} s, eval {result['eval_s']:.0f} s)",
          flush=True)
    if len(points) > 1:
        print("curve: " + ", ".join(f"{p['wall_s_excl_curve'] / 60:.2f} min -> {p['knn_top1']:.2f}%" for p in points))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # during the imports, before main's own guard
        print("time_to_accuracy: interrupted (Ctrl-C); no result written", file=sys.stderr)
        sys.exit(130)
