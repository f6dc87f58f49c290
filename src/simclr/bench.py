"""``simclr bench``: the reference input/compute path against the fast one.

    simclr bench --arch resnet50 --data cifar10 --batch_size 1024 --steps 50

The fast path runs first, then the reference (``--repeat``: alternating); on CUDA in this process, on a CPU each
run in a fresh process of its own (``--isolate``, :func:`isolated_run`). Each run in its own guard: a path that
runs out of memory is recorded as ``"oom"`` (another failure as its error message) and the other path is still timed
and reported; the exit status is 1 when a path failed. Both paths train the same
model for ``--warmup`` untimed steps (worker start-up, cuDNN autotuning, ``torch.compile``) and
then ``--steps`` timed ones:

* reference — the spec's way: PIL/torchvision transforms in DataLoader worker processes,
  fp32, NCHW, no compile, the plain per-parameter LARS step;
* fast — the project's defaults: the dataset on the device, batched per-view augmentation there (on a CPU in
  a background thread, one step ahead), bf16 autocast and channels_last (on CUDA, and on a CPU that computes
  bf16 natively: ``runtime.fast_compute``), ``torch.compile`` (CUDA), multi-tensor LARS;
* fast-step (only when asked for, ``--paths fast,reference,fast-step``) — the fast path's training step alone,
  every step on the same first batch: no input pipeline at all, so its images/s bound what any input path could
  give the fast path's step (the ``ceiling`` line: fast-step / reference).

Each path reports unique images/s, ms per step, the data-wait fraction (the share of the
timed interval spent producing the next batch: on CUDA the device time between two events
around ``next(batches)`` — the copy and augmentation kernels plus any idle wait for the
host —, on CPU the host time in ``next``), and peak device memory. CUDA timings use
CUDA events; the step has no host synchronisation (loss values are never read).
"""
from __future__ import annotations

import gc
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import config as config_lib
from .config import nonneg, option, positive, seed_range
from .errors import ConfigError
from .files import atomic_write, claim_output, git_state

if TYPE_CHECKING:  # imported where used: --help and a bad option answer without torch
    import torch

PATHS = ("fast", "reference", "fast-step")  # the order they run in
DEFAULT_PATHS = "fast,reference"

BENCH_MARK = b'"command": "simclr bench'  # the first key of every --json file bench writes


@dataclass
class BenchConfig:
    """Throughput of the reference path vs the fast path."""

    COMMAND = "bench"
    YAML = False

    arch: str = option("resnet50", "encoder, as pretrain's --arch (resnet50x2, timm:<model name> ...)")
    width: int = option(0, "first-stage channels of a ResNet (64 = standard; 0 = 64 x the arch's multiplier)",
                        check=nonneg, check_msg="must be >= 0")
    timm_kwargs: str = option("", "extra timm.create_model arguments (JSON object) for a timm: arch")
    data: str = option("cifar10", "dataset (cifar10, cifar100, stl10, imagenet, folder)")
    data_path: str = option("", "image folder for --data folder")
    image_size: int = option(0, "input side (0 = the dataset's own)", check=nonneg, check_msg="must be >= 0")
    batch_size: int = option(1024, "unique images per step", check=positive, check_msg="must be > 0")
    multiplier: int = option(2, "augmented views per image (m)", check=positive, check_msg="must be > 0")
    steps: int = option(50, "timed steps per path (after warm-up steps)", check=positive, check_msg="must be > 0")
    warmup: int = option(5, "untimed steps before timing (compile, autotune)", check=lambda x: x >= 1,
                         check_msg="must be >= 1 (the first step includes start-up)")
    workers: int = option(min(16, os.cpu_count() or 1), "DataLoader workers of the reference path (default: the "
                          "CPU count, at most 16)", check=nonneg, check_msg="must be >= 0")
    train_subset: int = option(0, "use this many training images (0 = all)", check=nonneg, check_msg="must be >= 0")
    device: str = option("auto", "device to time on: auto, cpu or cuda")
    paths: str = option(DEFAULT_PATHS, "comma-separated: fast, reference, fast-step (they run in that order; "
                        "fast-step: the fast path's step alone on one fixed batch, the bound of any input path)")
    compile: str = option("auto", "torch.compile on the fast path (auto: on CUDA)", ["auto", "on", "off"])
    channels_last: str = option("auto", "channels_last on the fast path (auto: on CUDA and on a CPU with native "
                                "bf16)", ["auto", "on", "off"])
    precision: str = option("auto", "fast path autocast (auto: bf16 on CUDA and on a CPU with native bf16, else "
                            "fp32)",
                            ["auto", "bf16", "fp16", "fp32"])
    interpolation: str = option("auto", "crop resampling of the fast path", ["auto", "bilinear", "bicubic"])
    data_only: bool = option(False, "time the input pipelines alone (no model): images/s that each path can deliver")
    json: str = option("", "also write the results to this JSON file")
    force: bool = option(False, "overwrite --json even when it is a file simclr bench did not write")
    seed: int = option(0, "random seed of the model and the data order", **seed_range(draw=False))
    threads: int = option(0, "CPU threads of the main process (0 = torch's default)", check=nonneg,
                          check_msg="must be >= 0")
    isolate: str = option("auto", "run each timed run in a fresh process of its own, as each path would run as a "
                          "program, so that one path's process-wide settings (the allocator, threads, heap) never "
                          "reach the other (auto: on a CPU)", ["auto", "on", "off"])
    repeat: int = option(1, "run the paths this many times, alternating, and report each path's median run (for "
                            "noisy shared machines)", check=positive, check_msg="must be > 0")
    scan_files: int = option(0, "instead of training: time a start's read of a synthetic image folder of this "
                             "many files (walk, content identity, header check), in files/s", check=nonneg,
                             check_msg="must be >= 0")

    def check(self) -> None:
        for p in self.path_list():
            if p not in PATHS:
                raise ConfigError(f"--paths: unknown path {p!r}; allowed: {', '.join(PATHS)}")
        if self.data_only and "fast-step" in self.path_list():
            raise ConfigError("--data_only times the input pipelines, and the fast-step path has none: drop one "
                              "of --data_only and fast-step from --paths")

    def path_list(self) -> list:
        return [p.strip() for p in self.paths.split(",") if p.strip()]


def _on(flag: str, device: torch.device, auto: bool) -> bool:
    return flag == "on" or (flag == "auto" and auto)


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (for the record only: nothing is decided from it)."""
    import platform
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    import torch

    from .runtime import cpu_native_bf16
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    native = cpu_native_bf16()
    return (f"CPU ({cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} intra-op threads, "
            f"{'native bf16: ' + native if native else 'no native bf16'})")


def run_path(path: str, args, images, device: torch.device) -> dict:
    """Train ``args.warmup + args.steps`` steps on one path and time the last ``args.steps``."""
    import torch
    from . import config as config_lib
    from .data.fast import FastLoader
    from .options import PretrainConfig
    from .runtime import cpu_allocator, fast_compute, tune_cpu
    from .train import build, train_step, wrap

    fast = path in ("fast", "fast-step")
    if fast:  # what simclr pretrain sets up on this device; the reference path runs in a process of its own
        tune_cpu(device)
    channels_last = fast and _on(args.channels_last, device, fast_compute(device))
    compiled = fast and _on(args.compile, device, device.type == "cuda")
    cfg = config_lib.build(PretrainConfig, dict(
        arch=args.arch, width=args.width, timm_kwargs=args.timm_kwargs, image_size=args.image_size, data=args.data,
        data_path=args.data_path, batch_size=args.batch_size, multiplier=args.multiplier,
        seed=args.seed, workers=args.workers, loader="fast" if fast else "reference", device=str(device), lr=0.1,
        iters=args.warmup + args.steps,
        lr_schedule="const", precision=args.precision if fast else "fp32", channels_last=channels_last,
        compile=compiled))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    torch.manual_seed(args.seed)
    # the same parts and step as a training run; the reference path keeps the plain (per-tensor) LARS
    loader = FastLoader(cfg, images, device, interpolation=args.interpolation) if fast else None
    parts = build(cfg, images, device, foreach=fast, loader=loader)
    wrap(parts, distributed_run=False)
    amp = parts.amp_dtype
    parts.model.train()

    total = args.warmup + args.steps
    batches = parts.loader.batches(0, total)
    if path == "fast-step":  # the first batch, made once, then every step trains on it: no input pipeline
        first = next(batches)
        batches.close()
        batches = itertools.repeat(first)
    host_wait, dev_marks = 0.0, []
    t_setup = time.perf_counter()
    t_start = ev_start = ev_end = None
    for s in range(total):
        if s == args.warmup:
            if cuda:
                torch.cuda.synchronize(device)
                ev_start = torch.cuda.Event(enable_timing=True)
                ev_start.record()
            warmup_s = time.perf_counter() - t_setup
            t_start = time.perf_counter()
        timed = s >= args.warmup
        if timed and cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
        t0 = time.perf_counter()
        x, _ = next(batches)
        if timed:
            host_wait += time.perf_counter() - t0
            if cuda:
                e1.record()
                dev_marks.append((e0, e1))
        if args.data_only:
            loss = x.sum()  # consume the batch (the reference path's copy/the fast path's kernels)
            continue
        loss, _, _ = train_step(parts, x, s)
    if cuda:
        ev_end = torch.cuda.Event(enable_timing=True)
        ev_end.record()
        torch.cuda.synchronize(device)
        seconds = ev_start.elapsed_time(ev_end) / 1000
        data_s = sum(a.elapsed_time(b) for a, b in dev_marks) / 1000
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        seconds = time.perf_counter() - t_start
        data_s, peak = host_wait, None
    if path != "fast-step":
        batches.close()  # shuts the reference path's workers down
    aug_thread = path == "fast" and bool(getattr(parts.loader, "prefetch", False))  # the fast path on a CPU
    final_loss = float(loss.detach())
    del parts, batches, x, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {
        "path": path, "images_per_s": args.steps * args.batch_size / seconds,
        "ms_per_step": 1000 * seconds / args.steps,
        "data_wait_frac": data_s / seconds, "peak_mem_gib": peak, "warmup_s": warmup_s,
        "precision": str(amp).replace("torch.", "") if amp else "fp32", "channels_last": channels_last,
        "compile": compiled, "workers": args.workers if not fast else 0, "final_loss": final_loss,
        "lars": "foreach" if fast else "plain", "data_only": bool(args.data_only),
        "threads": torch.get_num_threads(), "aug_thread": aug_thread, "cpu_allocator": cpu_allocator(),
        "process": os.getpid(),
    }


def guarded_run(path: str, args, images, device: torch.device) -> dict:
    """``run_path``, with a failure recorded instead of raised: ``status`` "ok", "oom" or "error" (and
    ``error``, the first line of the message), so one path running out of memory does not lose the other's
    numbers. Bad input (a UserError) is not a path's failure: it propagates as the CLI's ``error:`` line."""
    import torch

    from .errors import UserError
    from .runtime import out_of_memory
    failure = None
    try:
        return {**run_path(path, args, images, device), "status": "ok"}
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of one path is recorded; Ctrl-C still stops
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        failure = {"path": path, "status": "oom" if out_of_memory(e) else "error",
                   "error": f"{type(e).__name__}: {first}"}
    # outside the except block: the traceback (and the path's model and batches in its frames) is gone
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return failure


def isolated_run(path: str, args, device: torch.device) -> dict:
    """:func:`guarded_run` in a fresh process (``spawn``: nothing of this process's heap, threads or allocator
    settings is inherited), which reads the images itself. On a CPU a path's process-wide set-up is part of what
    is measured: the fast path keeps freed memory for the next step (``runtime.tune_cpu``), as ``simclr pretrain``
    does, while the spec's program runs with the C library's defaults; in one shared process the second path
    would inherit the first's."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_child_run, path, args, str(device)).result()


def _child_run(path: str, args, device: str) -> dict:
    import torch

    from .progress import TERMINAL
    TERMINAL.muted = True  # the parent prints; a failure comes back as the run's status
    if args.threads:
        torch.set_num_threads(args.threads)
    return guarded_run(path, args, bench_images(args), torch.device(device))


def bench_images(args):
    """The images both paths train on: ``--data`` (its pretraining split), ``--train_subset`` of them."""
    from .data import get_dataset, maybe_subset
    return maybe_subset(get_dataset(args.data, "pretrain", args.data_path, args.image_size), args.train_subset, 0)


def format_table(results: list) -> str:
    lines = [f"{'path':<10} {'images/s':>10} {'ms/step':>9} {'data wait':>9} {'peak mem':>9} {'warm-up':>8}  setup"]
    for r in results:
        if r.get("status", "ok") != "ok":
            what = "out of memory" if r["status"] == "oom" else "failed"
            lines.append(f"{r['path']:<10} {what.upper()}: {r['error']}")
            continue
        mem = f"{r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else "n/a"
        setup = "input pipeline only, " if r.get("data_only") else ""
        if not r.get("data_only"):
            setup += (f"{r['precision']}, {'channels_last' if r['channels_last'] else 'NCHW'}, "
                      f"{'compiled' if r['compile'] else 'eager'}, {r['lars']} LARS, ")
        setup += f"{r.get('threads', '?')} intra-op threads, "
        setup += (f"{r['workers']} workers" if r["path"] == "reference" else
                  "one fixed batch, no input pipeline" if r["path"] == "fast-step" else
                  "aug in a background thread" if r.get("aug_thread") else "on-device aug")
        if r.get("cpu_allocator", "default") != "default":
            setup += ", freed memory kept"
        lines.append(f"{r['path']:<10} {r['images_per_s']:>10.1f} {r['ms_per_step']:>9.1f} "
                     f"{100 * r['data_wait_frac']:>8.1f}% {mem:>9} {r['warmup_s']:>7.1f}s  {setup}")
    return "\n".join(lines)


def pair_ratios(runs: list, reference: list) -> list:
    """Run k's images/s over the reference's run k, for each k where both succeeded: the two runs of a pair are
    next to each other in time, so a machine's slow drift cancels in their ratio (with ``--repeat``)."""
    return [a["images_per_s"] / b["images_per_s"] for a, b in zip(runs, reference)
            if a["status"] == b["status"] == "ok"]


def spread_note(ratios: list) -> str:
    """How far the pairs' ratios spread (several pairs only): the noise of the machine around the medians' ratio."""
    if len(ratios) < 2:
        return ""
    return f" (pair by pair: {min(ratios):.2f}x to {max(ratios):.2f}x over {len(ratios)} pairs)"


def path_result(runs: list) -> dict:
    """A path's reported run: the median of its successful runs, else its first failure."""
    ok = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["images_per_s"])
    return ok[(len(ok) - 1) // 2] if ok else runs[0]


def scan_startup(n: int) -> dict:
    """A start's read of an image folder of ``n`` small JPEGs in 10 class folders (written to a temporary folder
    first, so the page cache is warm: the figure is the file-system calls' cost, not the disk's)."""
    import io
    import shutil
    import tempfile

    import numpy as np
    from PIL import Image

    from .data import get_dataset
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    root = Path(tempfile.mkdtemp(prefix="simclr-scan-"))
    try:
        for c in range(10):
            (root / "train" / f"class{c}").mkdir(parents=True)
        for i in range(n):  # bytes after the JPEG's end marker make each file its own content
            (root / "train" / f"class{i % 10}" / f"{i:08d}.jpg").write_bytes(jpeg + i.to_bytes(4, "little"))
        t = time.perf_counter()
        ds = get_dataset("folder", "train", str(root), 32)
        seconds = time.perf_counter() - t
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"files": len(ds), "seconds": seconds, "files_per_s": len(ds) / seconds}


def main(argv) -> int:
    args, _ = config_lib.parse(BenchConfig, argv)
    if args.scan_files:
        if args.json:
            claim_output(Path(args.json), BENCH_MARK, "bench", args.force, "--json")
        res = scan_startup(args.scan_files)
        print(f"start-up read of {res['files']} image files (walk, content identity, header check): "
              f"{res['seconds']:.2f} s, {res['files_per_s']:.0f} files/s")
        if args.json:
            atomic_write(Path(args.json), json.dumps({"command": "simclr bench " + " ".join(argv),
                                                      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                                      "commit": git_state().label, "scan": res}, indent=2))
        return 0
    import torch
    # the fast path first: it is the one being measured, and the reference (fp32, NCHW, no compile) is the one
    # that runs out of memory at large batches
    paths = sorted(set(args.path_list()), key=PATHS.index)
    if args.json:  # before any work: never over a file another program (or the user) wrote
        claim_output(Path(args.json), BENCH_MARK, "bench", args.force, "--json")
    from .runtime import resolve_device
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":  # both paths: cuDNN picks its fastest kernels during the warm-up steps
        torch.backends.cudnn.benchmark = True
    images = bench_images(args)
    width = f" (width {args.width})" if args.width else ""
    print(f"simclr bench: {args.arch}{width} on {args.data} ({len(images)} images, "
          f"{images.image_size}px), batch {args.batch_size} x {args.multiplier} views, {args.warmup} warm-up + "
          f"{args.steps} timed steps per path, {device_name(device)}", flush=True)
    runs: dict = {p: [] for p in paths}
    isolate = args.isolate == "on" or (args.isolate == "auto" and device.type == "cpu")
    if isolate:
        print("each run in a fresh process of its own (--isolate)", flush=True)

    def summary(final: bool) -> dict:
        results = [path_result(runs[p]) for p in paths if runs[p]]
        by = {r["path"]: r for r in results if r["status"] == "ok"}
        ref = by.get("reference", {}).get("images_per_s")
        speedup = by["fast"]["images_per_s"] / ref if ref and "fast" in by else None
        ceiling = by["fast-step"]["images_per_s"] / ref if ref and "fast-step" in by else None
        spread = {p: pair_ratios(runs.get(p, []), runs.get("reference", [])) for p in ("fast", "fast-step")}
        failed = sorted({r["path"] for p in paths for r in runs[p] if r["status"] != "ok"}, key=PATHS.index)
        out = {"command": "simclr bench " + " ".join(argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "commit": git_state().label, "device": device_name(device), "torch": torch.__version__,
               "args": config_lib.to_dict(args), "n_images": len(images), "image_size": images.image_size,
               "complete": final, "failed": failed,
               "results": results, "speedup": speedup, "ceiling": ceiling,
               "speedup_pairs": spread["fast"], "ceiling_pairs": spread["fast-step"], "all_runs": runs}
        if args.json:  # written after every run, so a run cut short by a time limit keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(Path(args.json), json.dumps(out, indent=2))
        return out

    for _ in range(args.repeat):
        for p in paths:
            if any(r["status"] != "ok" for r in runs[p]):
                continue  # a path that failed (out of memory) fails again: its repeats would only cost time
            runs[p].append(isolated_run(p, args, device) if isolate else guarded_run(p, args, images, device))
            print(format_table(runs[p][-1:]).splitlines()[-1], flush=True)
            summary(final=False)
    out = summary(final=True)
    print("\nmedian of %d run(s) per path:" % args.repeat if args.repeat > 1 else "")
    print(format_table(out["results"]))
    if out["speedup"] is not None:
        print(f"speed-up (fast / reference images/s): {out['speedup']:.2f}x{spread_note(out['speedup_pairs'])}")
    if out["ceiling"] is not None:
        print(f"ceiling (fast-step / reference images/s: the fast path's step with no input pipeline): "
              f"{out['ceiling']:.2f}x{spread_note(out['ceiling_pairs'])}")
    if args.json:
        print(f"wrote {args.json}")
    if out["failed"]:
        bad = [r for p in out["failed"] for r in runs[p] if r["status"] != "ok"][:1]
        print(f"error: bench path(s) failed: {', '.join(out['failed'])} ({bad[0]['error']}); the other paths' "
              f"numbers are above" + (f" and in {args.json}" if args.json else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
