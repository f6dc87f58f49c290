"""SimCLR pretraining, in reading order: :func:`pretrain` (the entry), :func:`setup` (resume point, data, parts,
run folder; bad input fails there, before any folder is created), :func:`loop` (the steps, with log, kNN and
save points), and :func:`train_step` (forward, the loss, backward, guarded update) on the :class:`Parts` that
:func:`build` makes once.

Counted in optimizer steps: everything that depends on time (learning rate, which images a step draws, their
augmentations, the kNN schedule) is a function of the global step, so a resumed run continues the same
trajectory. Signals belong to the caller: :func:`pretrain` only asks ``should_stop()`` after each step, then
saves and stops. ``simclr bench`` and benchmarks/ call :func:`build`, :func:`wrap` and :func:`train_step`.
"""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from .. import checkpoint as ckpt_lib
from .. import config as config_lib
from .. import distributed
from .. import trackers
from ..config import switch_on
from ..data import check_same_classes, data_folder, get_dataset, maybe_subset, native_size
from ..data.loaders import build_loader
from ..data.scan import one_scan
from ..errors import UserError
from ..evaluate.monitor import knn_monitor
from ..files import append_line
from ..gradcache import grad_cache_backward
from ..loss import Criterion, build_criterion
from ..models import SimCLRModel, build_model, convert_sync_batchnorm
from ..optim import build_optimizer, lr_schedule, scaled_lr, set_lr
from ..options import PretrainConfig
from ..names import is_timm, resolve_width
from ..progress import Progress, hms, rate, say
from ..rundir import (RunDir, check_kind, check_run_folder, environment, find_run_dir, hold_lock, is_run, newest_run,
                      release_held)
from ..runtime import (autocast_dtype, channels_last_on, cuda_rng_state, describe_compute, out_of_memory,
                       precision_name, resolve_device, rng_state, seed_everything, set_rng_state, tune_backends)
from .data_identity import check_data_identity, refusal_recorded
from .probe import Probe, build_probe
from .resume_message import changes_message


# --------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------
def pretrain(cfg: PretrainConfig, should_stop: Callable[[], bool] = lambda: False,
             started: Callable[[], None] = lambda: None) -> dict:
    """Set up and run ``cfg``; returns the final metrics, step, status and run folder. ``should_stop`` is asked
    after every step (the entry point answers it from SIGTERM/SIGINT); the run then saves and stops.
    ``started`` is called once the set-up is done, as the loop begins (the entry point: from here on a signal
    waits for the step; before, it stops at once)."""
    s = None
    try:
        s = setup(cfg)
        started()
        return loop(s, should_stop)
    except BaseException as raised:
        e = out_of_memory_error(cfg, s, raised) if out_of_memory(raised) else raised
        failure = distributed.peer_failure(e, s.dist.rank if s else 0)
        if s is not None and s.run is not None:  # SystemExit: a second signal exits without saving
            status = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"
            try:
                s.run.set_status(status, step=s.step, error=f"{type(e).__name__}: {e}")
            except (OSError, UserError):
                pass
            finally:
                s.run.close()  # the heartbeat stops and the run folder's lock is released
        if failure is not None:  # a peer died or hung: one clear line instead of a gloo/NCCL traceback
            e = failure
        if s is not None and s.run is not None and isinstance(e, UserError):
            e.run_dir = str(s.run.path)  # the entry point says how to continue
        if failure is not None:
            raise failure from None
        if e is not raised:
            raise e from None
        raise
    finally:
        release_held()  # a set-up that failed before its RunDir took the run folder's lock over
        distributed.cleanup()


def out_of_memory_error(cfg: PretrainConfig, s: Optional[Session], e: BaseException) -> UserError:
    """An allocation that failed for want of memory, as one line: what was asked of the device and the three
    ways to ask less (the activations grow with the batch, and with the model's width and depth)."""
    device = s.parts.device if s is not None and s.parts is not None else cfg.device
    if is_timm(cfg.arch):
        model = cfg.arch
    else:
        arch, width = resolve_width(cfg.arch, cfg.width, cfg.width_multiplier)
        model = f"{arch} width {width}"
    chunks = (f"raise --grad_cache_chunks (now {cfg.grad_cache_chunks})" if cfg.grad_cache_chunks > 1 else
              "pass --grad_cache_chunks K (the same gradient in K chunks of the batch, about 1/K of the activations)")
    size = native_size(cfg.data, cfg.image_size)
    return UserError(f"out of memory on {device}: --batch_size {cfg.batch_size} x {cfg.multiplier} views of {size}px "
                     f"through {model} does not fit; {chunks}, lower --batch_size, or train a smaller model "
                     f"(--arch, --width)")


def random_init_knn(cfg: PretrainConfig) -> float:
    """kNN top-1 of the same network at random initialisation (the baseline a run must beat)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed if cfg.seed >= 0 else 0)
    train = maybe_subset(get_dataset(cfg.data, "train", cfg.data_path, cfg.image_size), cfg.train_subset, 0)
    test = maybe_subset(get_dataset(cfg.data, "test", cfg.data_path, cfg.image_size), cfg.test_subset, 0)
    model = build_model(cfg, train.image_size).to(device)
    if channels_last_on(cfg.channels_last, device):  # the layout training and evaluation use
        model = model.to(memory_format=torch.channels_last)
    return knn_monitor(model.convnet, train, test, train.image_size, device, autocast_dtype(cfg.precision, device),
                       cfg.knn_k, cfg.knn_t)["knn_top1"]

# --------------------------------------------------------------------------------------------
# setting a run up: messages, resume, data, parts, run folder; saving
# --------------------------------------------------------------------------------------------
class Log:
    """Messages of the main process: the terminal (with --verbose) and the run's log.txt. Messages from before
    the run folder exists (resume notes) go into log.txt once it does."""

    def __init__(self, main: bool, verbose: bool):
        self.main, self.verbose, self.run, self._pending = main, verbose, None, []

    def attach(self, run: RunDir) -> None:
        self.run = run
        for msg in self._pending:
            run.log(msg)
        self._pending = []

    def __call__(self, msg: str) -> None:
        if not self.main:
            return
        if self.verbose:  # a bar on a terminal, timestamped lines in a log file (SLURM, a pipe)
            say(msg)
        if self.run is not None:
            self.run.log(msg)
        else:
            self._pending.append(msg)

    def warn(self, msg: str) -> None:
        """Also on stderr with --verbose false: a skipped corrupt checkpoint must not go unseen."""
        if self.main and not self.verbose:
            print(msg, file=sys.stderr, flush=True)
        self(msg)


@dataclass
class Session:
    """One pretraining run as :func:`setup` leaves it, ready for :func:`loop`: what it was given, what it trains
    with, and what changes as it trains (saved in every checkpoint)."""
    cfg: PretrainConfig
    dist: distributed.DistInfo
    parts: Parts
    log: Log
    images: object                # the pretraining images (after --train_subset)
    bad_images: list              # unreadable files skipped with --skip_bad_images
    run: Optional[RunDir] = None  # the run folder (main process only)
    knn_sets: tuple = ()          # the kNN monitor's (train, test) images
    step: int = 0
    nan_skips: int = 0
    saved_step: int = -1          # the step whose checkpoint is on disk already (never rewritten in place)
    data_fingerprint: str = ""    # the pretraining split's files_identity: its content (checkpoints' data_content) ...
    data_listing: str = ""        # ... and its names and sizes only
    metrics: dict = field(default_factory=dict)


def resume_point(cfg: PretrainConfig, log: Log, lock: bool = False) -> tuple[Optional[Path], str]:
    """The checkpoint to continue from (None: start at step 0; else pinned against pruning, see
    :func:`simclr.checkpoint.pin`) and the run folder to write into ('' : a new one).

    A run folder's identity is its location: ``--resume RUN`` continues RUN in place, from its newest valid
    checkpoint, or, before it saved one, from the checkpoint it branched from (its recorded ``ckpt``). A
    checkpoint given with ``--ckpt`` starts a new run folder (its path recorded as ``ckpt`` in config.yaml) unless
    it lies in the run being resumed (``--resume`` / ``--run_dir``): branching never writes into the original.
    With ``lock`` (the main process) an existing run folder to write is locked before its checkpoints are read."""
    run = resumed_run(cfg, log)
    if run is not None:
        if lock:
            hold_lock(run)
        chosen = ckpt_lib.resolve(cfg.ckpt, log=log.warn) if cfg.ckpt else None
        if chosen is not None and _inside(chosen, run):  # a chosen checkpoint of this very run
            return (chosen if ckpt_lib.pin(chosen) else None), str(run)
        path = ckpt_lib.latest_valid(run, log=log.warn)
        if path is None and chosen is not None:  # branched from `chosen`, stopped before its first save
            ckpt_lib.pin(chosen)
            path = chosen
        if path is None:
            log(f"note: no valid checkpoint in {run}; starting it from step 0")
        return path, str(run)
    if cfg.ckpt:
        path = ckpt_lib.resolve(cfg.ckpt, log=log.warn)
        origin = find_run_dir(path)
        if cfg.run_dir and origin is not None and _same(Path(cfg.run_dir), origin):
            if lock:
                hold_lock(Path(cfg.run_dir))
            return (path if ckpt_lib.pin(path) else None), cfg.run_dir
        cfg.ckpt = str(Path(path).resolve())  # the new run's origin, recorded in its config.yaml
        if origin is not None:
            log(f"note: starting a new run folder from {cfg.ckpt} (its run folder {origin} is left as it is; "
                f"to continue that run use --resume {origin})")
        ckpt_lib.pin(path)
        return path, cfg.run_dir
    if cfg.run_dir:
        _check_pretrain_folder(Path(cfg.run_dir))
    return None, cfg.run_dir


def resumed_run(cfg: PretrainConfig, log: Log) -> Optional[Path]:
    """The run folder ``--resume`` names (None: none, or ``auto`` found none)."""
    if cfg.resume == "auto":
        if cfg.run_dir:
            run = Path(cfg.run_dir)
            _check_pretrain_folder(run)
            return run if run.is_dir() else None
        run = newest_run(Path(cfg.root) / cfg.name, "pretrain")
        if run is None:
            log(f"note: no pretraining run under {Path(cfg.root) / cfg.name}; starting from step 0")
        return run
    if not cfg.resume:
        return None
    run = Path(cfg.resume)
    if not run.is_dir():
        raise UserError(f"--resume takes a run folder or 'auto', got {config_lib.shown(cfg.resume)}: no such "
                        f"folder (to continue from one file use --ckpt PATH)")
    if not is_run(run):
        inside = newest_run(run, "pretrain")
        hint = (f"; it holds runs, the newest is {inside}: continue it with --resume {inside}" if inside is not None
                else "; to start a run in it use --resume auto --run_dir " + str(run))
        raise UserError(f"--resume {run}: not a run folder (no config.yaml or status.json in it){hint}")
    _check_pretrain_folder(run)
    if cfg.run_dir and not _same(Path(cfg.run_dir), run):
        raise UserError(f"--resume continues {run} in place, but --run_dir names {cfg.run_dir}; to branch into "
                        f"another folder use --ckpt {run} --run_dir {cfg.run_dir}")
    return run


def _check_pretrain_folder(run: Path) -> None:
    """Before any work: refuse a folder that holds links or special files, or another kind of run."""
    if run.is_dir():
        check_run_folder(run)
        check_kind(run, "pretrain")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def _inside(ckpt: Path, run: Path) -> bool:
    found = find_run_dir(ckpt)
    return found is not None and _same(found, run)


def config_changes(saved: dict, cfg: PretrainConfig) -> dict:
    """{key: (checkpoint's value, this run's value)} for the options that change where a run goes (role
    ``trajectory``) that differ: a resume that changes them is a different run unless allowed."""
    return {k: (saved[k], getattr(cfg, k)) for k in config_lib.with_role(type(cfg), "trajectory")
            if k in saved and saved[k] != getattr(cfg, k)}


def read_resume(path: Path, cfg: PretrainConfig, seed_drawn: bool, log: Log) -> dict:
    """Read a pretraining checkpoint to continue from (then unpin it); check it fits ``cfg``, adopt its seed."""
    try:
        ck = ckpt_lib.read(path)
    finally:
        ckpt_lib.unpin(path)
    if not isinstance(ck, dict) or ck.get("format") != ckpt_lib.FORMAT or "model" not in ck:
        raise UserError(f"{path} is not a pretraining checkpoint of this project "
                        f"({ckpt_lib.describe(ck)}); to evaluate the spec's checkpoints use simclr eval")
    saved = ck.get("config", {})
    for key in config_lib.with_role(type(cfg), "shapes"):  # what the weights' shapes depend on
        if key in saved and saved[key] != getattr(cfg, key):
            raise UserError(f"checkpoint {path} was trained with {key}={saved[key]!r} but this run has "
                            f"{key}={getattr(cfg, key)!r}; pass --{key} {saved[key]}")
    seed = saved.get("seed")
    if seed_drawn and isinstance(seed, int) and seed >= 0:
        # data order and augmentations are functions of (seed, step): continuing the same trajectory needs the
        # checkpoint's seed, and a drawn one (--seed -1, the default) is replaced silently
        cfg.seed = seed
    changes = config_changes(saved, cfg)
    if changes and not cfg.allow_config_change:
        raise UserError(changes_message(path, changes))
    for k, (old, new) in changes.items():
        log.warn(f"warning: {path} was trained with {k}={old!r}, this run continues with {k}={new!r} "
                 f"(--allow_config_change)")
    ck["config_changes"] = {k: list(v) for k, v in changes.items()}
    return ck




def restore(s: Session, ck: dict, path: Path) -> None:
    p, log = s.parts, s.log
    ckpt_lib.load_weights(p.model, ck["model"], f"checkpoint {path}",
                          "resume with the run's own --arch, --width and projection options")
    optimizer_keys = config_lib.with_role(type(s.cfg), "optimizer")  # another value: another optimizer
    changed = [f"--{k} {old!r} -> {new!r}" for k, (old, new) in ck.get("config_changes", {}).items()
               if k in optimizer_keys]
    if changed:  # torch loads another optimizer's state silently, then fails in step() (KeyError 'step')
        raise UserError(f"checkpoint {path} holds the optimizer state of another optimizer ({', '.join(changed)}); "
                        f"it cannot be carried over: resume with the run's own --opt and --lars_exclude")
    try:
        p.optimizer.load_state_dict(ck["optimizer"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        raise UserError(f"checkpoint {path}: its optimizer state does not fit this run's optimizer ({e}); resume "
                        f"with the run's own --opt and --lars_exclude") from None
    if p.probe is not None:
        if ck.get("probe"):
            p.probe.load_state_dict(ck["probe"])
        else:
            log(f"note: {path} has no online probe: this run's probe starts from zero at step {ck['step']}")
    if ck.get("scaler"):
        p.scaler.load_state_dict(ck["scaler"])
    saved_compute = ck.get("compute")
    if isinstance(saved_compute, dict) and saved_compute != p.compute:  # e.g. moved to a CPU without bf16
        log(f"note: {path} was trained with {_compute_text(saved_compute)}; this run continues with "
            f"{_compute_text(p.compute)} (--precision and --channels_last resolve per machine; the run goes on "
            f"from the same weights, a little apart numerically from an uninterrupted one)")
    if ck.get("rng") and (note := set_rng_state(ck["rng"], p.device, s.dist.rank)):
        log(note)
    s.step = s.saved_step = int(ck["step"])
    s.nan_skips = int(ck.get("nan_skips", 0))
    if isinstance(ck.get("metrics"), dict):  # the kNN so far (best, at init, last): a finished run needs no rerun
        s.metrics = dict(ck["metrics"])
    log(f"resumed from {path} at step {s.step}")


def _compute_text(compute: dict) -> str:
    return f"{compute.get('precision')}, {'channels_last' if compute.get('channels_last') else 'NCHW'}"


def setup(cfg: PretrainConfig) -> Session:
    """Processes, seeds, the checkpoint to resume, data, parts, and (main process) the run folder. Bad input
    fails here, before any folder is created."""
    trackers.require(cfg.logger, cfg.mlflow_uri)  # every process: a missing package stops them all alike
    dist = distributed.init("cuda" if cfg.device.startswith("cuda") or
                            (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    device = resolve_device(cfg.device, dist.local_rank)
    log = Log(dist.is_main, cfg.verbose)
    seed_drawn = cfg.seed < 0
    if seed_drawn:
        cfg.seed = int(distributed.broadcast_object(random.SystemRandom().randrange(2 ** 31)))
    resume_from, run_dir = resume_point(cfg, log, lock=dist.is_main)  # locked before its checkpoint is read
    # a refused resume says "failed" (a requeue loop stops); the split's folder is read once for both of its uses
    with refusal_recorded(run_dir, dist.is_main), one_scan():
        ck = read_resume(resume_from, cfg, seed_drawn, log) if resume_from is not None else None
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        seed_everything(cfg.seed + dist.rank)
        images = get_dataset(cfg.data, "pretrain", cfg.data_path, cfg.image_size, cfg.skip_bad_images)
        # grows while reading when workers == 0
        bad_images = getattr(images, "bad_images", None) or []
        fingerprint, listing = images.fingerprint, images.listing  # of the whole split (a subset is drawn from it)
        if ck is not None:
            check_data_identity(ck, images, resume_from, cfg.allow_config_change, log)
        images = maybe_subset(images, cfg.train_subset, seed=0)
        # every rank the same options and images before anything is built (a --width typo died in DDP, an --lr one
        # trained "successfully" with rank 0's value recorded); those of role per_process excepted (where each
        # process is, what it prints or writes: only rank 0 writes)
        per_process = config_lib.with_role(type(cfg), "per_process")
        shared = {k: v for k, v in config_lib.to_dict(cfg).items() if k not in per_process}
        # the content identity, not --data_path: each node may read its own copy of the images at its own path
        distributed.check_same_config(dict(shared, data_content=fingerprint))
        monitor_sets = knn_sets(cfg)
        s = Session(cfg, dist, build(cfg, images, device, dist.rank, dist.world), log, images, bad_images)
        s.knn_sets = monitor_sets
        s.data_fingerprint, s.data_listing = fingerprint, listing
        if ck is not None:
            restore(s, ck, resume_from)
        distributed.check_same(s.step, "the step to resume from")
    tune_backends(device, cfg.deterministic)
    wrap(s.parts, cfg, dist.enabled, warn=log.warn)
    if dist.is_main:
        run = RunDir.create(cfg.root, cfg.name, run_dir, data=data_folder(cfg.data, cfg.data_path))
        log.attach(run)
        if ck is not None and ck["config_changes"]:  # --allow_config_change: what changed, and when
            append_line(run.path / "config_history.jsonl", json.dumps(
                {"time": time.time(), "step": s.step, "changes": ck["config_changes"]}, default=str) + "\n")
        config_lib.save(cfg, run.path / "config.yaml", run_dir="")  # its location is its identity: not recorded
        run.record_environment(dict(environment(str(device)), data_fingerprint=fingerprint, compute=s.parts.compute))
        run.track(cfg.logger, config_lib.to_dict(cfg), cfg.name, cfg.mlflow_uri, warn=log.warn)
        if run.trackers.live:
            log(f"trackers: {run.trackers.describe()}")
        run.set_status("running", step=s.step, iters=cfg.iters)
        s.run = run
    return s


def save(s: Session) -> Optional[Path]:
    cfg, p = s.cfg, s.parts
    cuda_rng = distributed.all_gather_object(cuda_rng_state(p.device))  # every rank: each its own device's
    if s.run is None:
        return None
    path = ckpt_lib.checkpoint_path(s.run.path, s.step)
    if s.saved_step == s.step and path.exists():
        return path  # saved at this step already (e.g. save_freq then stop): no second write
    epochs = s.step / max(p.loader.steps_per_epoch, 1)
    payload = {"kind": "pretrain", "step": s.step, "image_size": s.images.image_size,
               "config": config_lib.to_dict(cfg), "model": ckpt_lib.model_state(p.model),
               "optimizer": p.optimizer.state_dict(), "scaler": p.scaler.state_dict(), "rng": rng_state(cuda_rng),
               "metrics": s.metrics, "nan_skips": s.nan_skips, "data_content": s.data_fingerprint,
               "data_listing": s.data_listing, "compute": p.compute}
    if p.probe is not None:
        payload["probe"] = p.probe.state_dict()
    card = {"arch": cfg.arch, "width": p.model.width, "timm_kwargs": p.model.timm_kwargs, "data": cfg.data,
            "image_size": s.images.image_size,
            "iters": cfg.iters, "epochs": epochs, "metrics": s.metrics}
    ckpt_lib.save_checkpoint(path, payload, card)
    s.saved_step = s.step
    ckpt_lib.prune(s.run.path, cfg.keep_last)
    return path


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
class Speed:
    """Images per second and the share of time spent waiting for the next batch, since the last lap."""

    def __init__(self, images_per_step: int, start_step: int):
        self.per_step, self.start_step, self.started = images_per_step, start_step, time.perf_counter()
        self.lap()

    def elapsed_and_eta(self, step: int, iters: int) -> tuple[float, float]:
        """Seconds since this invocation's loop began, and the remaining ones at its average pace."""
        elapsed = time.perf_counter() - self.started
        return elapsed, elapsed / max(step - self.start_step, 1) * (iters - step)

    def timed(self, batches):
        it = iter(batches)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.waited += time.perf_counter() - t
            self.steps += 1
            yield item

    def lap(self) -> tuple[float, float]:
        now = time.perf_counter()
        dt = max(now - getattr(self, "t0", now), 1e-9)
        out = (getattr(self, "steps", 0) * self.per_step / dt, getattr(self, "waited", 0.0) / dt)
        self.t0, self.steps, self.waited = now, 0, 0.0
        return out


def log_step(s: Session, loss: torch.Tensor, acc: torch.Tensor, speed: Speed, bar) -> None:
    loss_v = distributed.all_reduce_mean(loss).item()
    acc_v = distributed.all_reduce_mean(acc).item()
    images_per_s, data_frac = speed.lap()
    rec = {"step": s.step, "epoch": s.step / s.parts.loader.steps_per_epoch, "loss": loss_v,
           "contrast_acc": acc_v, "lr": float(s.parts.lrs[s.step - 1]), "images_per_s": images_per_s,
           "data_time_frac": data_frac, "nan_skips": s.nan_skips, "skipped_images": len(s.bad_images)}
    probe = ""
    if s.parts.probe is not None:
        top1 = s.parts.probe.window_top1()  # a collective, like the means above
        if top1 is not None:
            rec["online_linear_top1"] = s.metrics["online_linear_top1"] = top1
            probe = f" probe {top1:.1f}%"
    s.metrics.update(loss=loss_v, contrast_acc=acc_v)
    if s.run:
        s.run.log_metrics(rec)
        s.run.heartbeat(step=s.step)
    if bar.is_bar:  # off a terminal the step lines carry the loss (the bar's alive line would repeat a stale one)
        bar.set_postfix(loss=f"{loss_v:.3f}", acc=f"{acc_v:.3f}")
    elapsed, eta = speed.elapsed_and_eta(s.step, s.cfg.iters)
    mem = ""
    if s.parts.device.type == "cuda":
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(s.parts.device) / 2 ** 30
        mem = f" mem {rec['peak_mem_gib']:.1f} GiB"
    s.log(f"step {s.step}/{s.cfg.iters} epoch {rec['epoch']:.2f} loss {loss_v:.4f} contrast_acc {acc_v:.3f}{probe} "
          f"lr {rec['lr']:.4g} {rate(images_per_s)} img/s data {100 * data_frac:.0f}%{mem} "
          f"elapsed {hms(elapsed)} eta {hms(eta)}")


def knn_sets(cfg: PretrainConfig) -> tuple:
    """The kNN monitor's labelled (train, test) images: the same training images as pretraining when a subset
    is asked for. Read in the set-up, so that a missing or empty split, or one lacking a class, is refused before
    the run folder exists rather than at the first evaluation."""
    sets = tuple(maybe_subset(get_dataset(cfg.data, split, cfg.data_path, cfg.image_size, cfg.skip_bad_images), n,
                              seed=0) for split, n in (("train", cfg.train_subset), ("test", cfg.test_subset)))
    check_same_classes(*sets)  # labels meet here: one class list for both
    return sets


def monitor(s: Session, at_start: bool = False) -> dict:
    """The kNN monitor on every rank (each embeds its share); the main process records it."""
    cfg, p = s.cfg, s.parts
    s.log(f"step {s.step}: kNN monitor: embedding {len(s.knn_sets[0])} training and {len(s.knn_sets[1])} test "
          f"images{' (random init)' if at_start else ''}")
    res = knn_monitor(p.model.convnet, *s.knn_sets, s.images.image_size, p.device, p.amp_dtype,
                      cfg.knn_k, cfg.knn_t, progress=s.dist.is_main and cfg.verbose)
    if s.dist.is_main:
        if at_start:
            s.metrics["knn_start_top1"] = res["knn_top1"]
        else:
            s.metrics.update(res)
            s.metrics["best_knn_top1"] = max(s.metrics.get("best_knn_top1", 0.0), res["knn_top1"])
        if s.run:
            s.run.log_metrics({"step": s.step, "epoch": s.step / p.loader.steps_per_epoch, **res})
        s.log(f"step {s.step}{' (random init)' if at_start else ''}: kNN top-1 {res['knn_top1']:.2f}%  "
              f"top-5 {res['knn_top5']:.2f}%")
    distributed.barrier()
    return res


def announce(s: Session) -> None:
    cfg = s.cfg
    if s.step >= cfg.iters:
        s.log(f"nothing to do: the run is already at step {s.step} of {cfg.iters} (to train longer, resume it with "
              f"a larger --iters and --allow_config_change true)")
        return
    what = s.parts.model.name + (f" (width {cfg.width})" if s.parts.model.width % 64 else "")
    s.log(f"pretraining {what} on {cfg.data} ({len(s.images)} images, "
          f"{s.images.image_size}px), batch {cfg.batch_size} x {cfg.multiplier} views, {cfg.iters} steps "
          f"({cfg.iters / max(s.parts.loader.steps_per_epoch, 1):.1f} epochs), {s.parts.device}, "
          f"{s.dist.world} process(es), {describe_compute(s.parts.amp_dtype, s.parts.channels_last, s.parts.device)}"
          + (f"; run folder {s.run.path}" if s.run else ""))
    if s.bad_images:
        s.metrics["skipped_images"] = len(s.bad_images)
        s.log.warn(f"warning: skipped {len(s.bad_images)} unreadable image file(s), e.g. {s.bad_images[0]}")


def _due(step: int, every: int, iters: int) -> bool:
    return bool(every) and step % every == 0 and step != iters


def loop(s: Session, should_stop: Callable[[], bool]) -> dict:
    cfg, p = s.cfg, s.parts
    announce(s)
    if cfg.eval_at_start and s.step == 0:
        monitor(s, at_start=True)
    distributed.barrier()
    p.model.train()
    guard, speed, status = DivergenceGuard(cfg.on_nan, p.device), Speed(cfg.batch_size, s.step), "finished"
    stop_at = min(cfg.iters, s.step + cfg.stop_after) if cfg.stop_after else cfg.iters
    done_before = s.step >= cfg.iters and "knn_top1" in s.metrics  # a finished run resumed: nothing to redo
    bar = progress_bar(s)
    for x, y in speed.timed(p.loader.batches(s.step, cfg.iters)):
        loss, acc, updated = train_step(p, cfg, x, s.step, guard, y=y)
        if not updated:
            guard.record_skip(s)
        s.step += 1
        log_now = s.step % cfg.log_freq == 0 or s.step == cfg.iters
        eval_now, save_now = _due(s.step, cfg.eval_freq, cfg.iters), _due(s.step, cfg.save_freq, cfg.iters)
        if log_now or eval_now or save_now:  # nothing is logged, evaluated or saved after a non-finite step
            guard.stop_if_diverged(s)
        if log_now:
            log_step(s, loss, acc, speed, bar)
        bar.update(1)  # after the step's own line: off a terminal the bar speaks only after a silence
        if eval_now:
            monitor(s)
        if save_now:
            save(s)
        if s.step < cfg.iters and (should_stop() or s.step >= stop_at):
            status = "interrupted"
            break
    bar.close()
    guard.stop_if_diverged(s)
    if status == "finished" and not done_before:
        monitor(s)
    written_before = s.saved_step == s.step
    path = save(s)
    if path is not None and not written_before:
        s.log(f"saved checkpoint {path}")
    if s.run:
        s.run.trackers.results(dict(s.metrics, status=status), s.step, "summary.json")
        s.run.set_status(status, step=s.step, metrics=s.metrics)
        s.run.close()
    return dict(s.metrics, step=s.step, status=status, run_dir=str(s.run.path) if s.run else "")


def progress_bar(s: Session) -> Progress:
    """A bar on a terminal; under SLURM or a pipe the log lines are the progress, and a line with the step and
    ETA when they have been silent for a while (a long --log_freq)."""
    return Progress(s.cfg.iters, "pretrain", s.dist.is_main and s.cfg.verbose, initial=s.step)


# --------------------------------------------------------------------------------------------
# one step, and the parts it runs on
# --------------------------------------------------------------------------------------------
@dataclass
class Parts:
    """What a run trains with, built once by :func:`build`."""
    model: SimCLRModel            # unwrapped: checkpoints and evaluation use it
    forward: nn.Module            # what the step calls: the model, compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    lrs: np.ndarray               # the learning rate of every step
    loader: object                # .batches(start, end) -> (x: (m*N, 3, S, S) ordered [view 1; view 2; ...], y)
    device: torch.device
    criterion: Criterion          # (z: (m*N, d), step) -> (loss, contrastive accuracy): the --loss
    amp_dtype: Optional[torch.dtype]
    probe: Optional[Probe] = None  # the online linear probe (--online_probe)
    channels_last: bool = False   # --channels_last resolved for the device (auto: runtime.fast_compute)
    compile: bool = False         # --compile resolved for the device (auto: on for CUDA)

    @property
    def compute(self) -> dict:
        """The resolved precision and layout, as env.json and checkpoints record them."""
        return {"precision": precision_name(self.amp_dtype), "channels_last": self.channels_last}


def build(cfg: PretrainConfig, images, device: torch.device, rank: int = 0, world: int = 1,
          foreach: Optional[bool] = None, loader: Optional[object] = None) -> Parts:
    """Model, optimizer, schedule, scaler and batch source for ``cfg`` on ``images`` (not yet wrapped).
    ``foreach`` picks the multi-tensor LARS (default: on CUDA); ``loader`` replaces the config's batch source."""
    channels_last = channels_last_on(cfg.channels_last, device)
    compiled = switch_on(cfg.compile, device.type == "cuda")
    model = build_model(cfg, images.image_size).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and cfg.sync_bn:  # CPU/gloo too; compiled: our own batch norm (SyncBatchNorm breaks the graph)
        model = convert_sync_batchnorm(model, device, compiled=compiled)
    optimizer = build_optimizer(model, cfg.opt, cfg.lr, cfg.weight_decay, cfg.lars_exclude,
                                foreach=device.type == "cuda" if foreach is None else foreach)
    amp = autocast_dtype(cfg.precision, device)
    return Parts(model=model, forward=model, optimizer=optimizer, criterion=build_criterion(cfg),
                 scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
                 lrs=lr_schedule(scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling), cfg.iters, cfg.lr_schedule,
                                 cfg.warmup),
                 loader=loader if loader is not None else build_loader(cfg, images, device, rank, world),
                 device=device, amp_dtype=amp, probe=build_probe(cfg, images, model.feat_dim, device),
                 channels_last=channels_last, compile=compiled)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wrap(p: Parts, cfg: PretrainConfig, distributed_run: bool, warn: Callable[[str], None] = _stderr) -> None:
    """The module the step calls: DDP-wrapped with several processes, then compiled (``--compile``):
    ``compile(DDP(model))``, the documented order, which lets DDP overlap its all-reduce with the backward pass.
    With ``--compile auto`` a compile failure falls back to eager with one warning (:class:`EagerFallback`)."""
    forward: nn.Module = p.model
    if distributed_run:
        forward = nn.parallel.DistributedDataParallel(
            forward, device_ids=[p.device.index] if p.device.type == "cuda" else None)
    if p.compile:
        forward = EagerFallback(forward, warn) if cfg.compile == "auto" else torch.compile(forward)
    p.forward = forward
    if p.probe is not None:
        p.probe.wrap(distributed_run, p.device)


class EagerFallback(nn.Module):
    """``torch.compile(module)`` that runs ``module`` itself, from then on, when compiling fails (with one warning).

    torch.compile compiles on a call (the first, and again when shapes or the grad mode change), so failures show
    there: the first call falls back on any error (an error eager also hits is then raised by the eager call);
    later calls only on torch.compile's own errors. Every process compiles the same code, so they fall back
    together. Parameters are those of ``module`` (it is not registered twice)."""

    def __init__(self, module: nn.Module, warn: Callable[[str], None]):
        super().__init__()
        self.module, self.warn, self.called = module, warn, False
        try:
            self.compiled: Optional[nn.Module] = torch.compile(module)
        except Exception as e:  # e.g. a platform torch.compile does not support
            self.compiled = None
            self._fall_back(e)

    def _fall_back(self, e: BaseException) -> None:
        self.compiled = None
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        self.warn(f"warning: torch.compile failed ({type(e).__name__}: {why[:200]}); training continues eager "
                  f"(pass --compile false to skip compiling, --compile true to stop on this error)")

    def forward(self, *args, **kwargs):
        if self.compiled is not None:
            first, self.called = not self.called, True
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:
                if not (first or _is_compile_error(e)):
                    raise
                self._fall_back(e)
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):  # no_sync() and the like of the wrapped module
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def _is_compile_error(e: BaseException) -> bool:
    from torch._dynamo.exc import TorchDynamoException
    return isinstance(e, TorchDynamoException) or type(e).__module__.startswith(("torch._inductor", "torch._dynamo"))


def forward_backward(p: Parts, cfg: PretrainConfig, x: torch.Tensor, step: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The loss (``p.criterion`` at optimizer step ``step``) of the views ``x`` and its gradient in ``.grad``
    (scaled for fp16) -> (loss, accuracy, h of the first view ``(N, d)``), detached. The network runs under
    autocast; the loss is fp32. With ``grad_cache_chunks`` the batch is embedded and back-propagated chunk by chunk
    (same gradient, a chunk's activation memory; ``h`` then comes from the graph-free pass, and only when the probe
    needs it)."""
    if p.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    n = x.shape[0] // cfg.multiplier
    if cfg.grad_cache_chunks > 1:
        chunks: list = []
        loss, acc = grad_cache_backward(p.forward, x, p.criterion, cfg.multiplier, cfg.grad_cache_chunks,
                                        p.amp_dtype, scale=p.scaler.scale,
                                        on_h=chunks.append if p.probe is not None else None, step=step)
        h = None
        if chunks:
            h = torch.empty(x.shape[0], chunks[0][1].shape[1], device=x.device, dtype=chunks[0][1].dtype)
            for rows, hc in chunks:
                h[rows] = hc
            h = h[:n]
        return loss, acc, h
    with torch.autocast(x.device.type, dtype=p.amp_dtype, enabled=p.amp_dtype is not None):
        out = p.forward(x)
    loss, acc = p.criterion(out["z"], step)
    p.scaler.scale(loss).backward()
    return loss.detach(), acc.detach(), out["h"][:n].detach()


class DivergenceGuard:
    """What a non-finite loss or gradient norm does.

    ``stop``: the first bad step is recorded on the device (no host sync per step) and read by
    :meth:`first_bad` at log, eval and save points, so no checkpoint is ever written after it.
    ``skip``: decided at once (one sync per step): no update, batch-norm statistics restored.
    With fp16 loss scaling the scaler already skips overflowing gradients, so only the loss counts.
    """

    def __init__(self, policy: str, device: torch.device):
        self.policy = policy
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self._buffers: list = []

    def before(self, model: nn.Module) -> None:
        if self.policy == "skip":  # the forward pass changes running statistics: keep a copy to undo
            self._buffers = [b.detach().clone() for b in model.buffers()]

    def allows_update(self, loss: torch.Tensor, p: Parts, step: int) -> bool:
        bad = ~torch.isfinite(loss)
        if not p.scaler.is_enabled():
            grads = [q.grad for q in p.model.parameters() if q.grad is not None]
            if grads:
                bad = bad | ~torch.stack(torch._foreach_norm(grads)).isfinite().all()
        if self.policy == "stop":
            self._first_bad = torch.where(bad & (self._first_bad < 0), step, self._first_bad)
            return True
        if not bool(bad):
            return True
        p.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, old in zip(p.model.buffers(), self._buffers):
                b.copy_(old)
        return False

    def first_bad(self) -> int:
        """The first non-finite step on any rank, -1 if none (a collective: call it on every rank)."""
        return int(distributed.all_reduce_max(self._first_bad)) if self.policy == "stop" else -1

    def stop_if_diverged(self, s: Session) -> None:
        """``stop``, at a log, eval or save point and at the end: after a non-finite step, fail with the last good
        checkpoint untouched (a collective: every rank calls it at the same steps)."""
        first_bad = self.first_bad()
        if first_bad < 0:
            return
        s.step = first_bad  # steps completed with finite values: the state is that of checkpoint first_bad
        msg = f"non-finite loss or gradient at step {first_bad}"
        s.log(msg)
        if s.run:
            s.run.log_metrics({"step": first_bad, "event": "nan", "action": "stop"})
            s.run.set_status("failed", step=first_bad, error=f"{msg}; last good checkpoint kept; lower --lr or use "
                                                             f"--on_nan skip")
        raise UserError(f"{msg}: training stopped, the last good checkpoint is untouched. Lower --lr, or pass "
                        f"--on_nan skip.")

    def record_skip(self, s: Session) -> None:
        """``skip``: a step the guard skipped still counts (schedule, data order, logging, checkpoints go on)."""
        s.nan_skips += 1
        s.log(f"non-finite loss or gradient at step {s.step}: step skipped")
        if s.run:
            s.run.log_metrics({"step": s.step, "event": "nan", "action": "skip"})


def train_step(p: Parts, cfg: PretrainConfig, x: torch.Tensor, step: int, guard: DivergenceGuard,
               lr: Optional[float] = None, y: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Optimizer step ``step`` on the views ``x`` (learning rate ``lr``, default the schedule's) ->
    (loss, contrastive accuracy, updated); ``updated`` is False for a step the guard skipped. With labels
    ``y: (N,)`` the online probe (if any) takes its step on the first view's detached ``h``."""
    set_lr(p.optimizer, float(p.lrs[step]) if lr is None else lr)
    p.optimizer.zero_grad(set_to_none=True)
    guard.before(p.model)
    loss, acc, h = forward_backward(p, cfg, x, step)
    updated = guard.allows_update(loss, p, step)
    if updated:
        p.scaler.step(p.optimizer)
        p.scaler.update()
        if p.probe is not None and y is not None and h is not None:
            p.probe.step(h, y)
    return loss, acc, updated
