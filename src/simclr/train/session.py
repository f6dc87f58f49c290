"""Setting a pretraining run up: messages, the checkpoint to resume, data, parts, the run folder; and saving.

Bad input fails in :func:`setup`, before any folder is created.
"""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .. import checkpoint as ckpt_lib
from .. import config as config_lib
from .. import distributed
from .. import trackers
from ..data import get_dataset, maybe_subset
from ..errors import UserError
from ..options import PretrainConfig
from ..files import append_line
from ..progress import say
from ..rundir import RunDir, check_kind, check_run_folder, environment, find_run_dir, is_run, newest_run
from ..runtime import cuda_rng_state, resolve_device, rng_state, seed_everything, set_rng_state, tune_backends
from .step import Parts, build, wrap


# --------------------------------------------------------------------------------------------
# setting a run up: messages, resume, data, parts, run folder
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
class State:
    """What changes as a run trains (besides the parts' tensors); saved in every checkpoint."""
    step: int = 0
    nan_skips: int = 0
    saved_step: int = -1          # the step whose checkpoint is on disk already (never rewritten in place)
    metrics: dict = field(default_factory=dict)


@dataclass
class Session:
    """One pretraining run as :func:`setup` leaves it, ready for :func:`loop`."""
    cfg: PretrainConfig
    dist: distributed.DistInfo
    parts: Parts
    state: State
    log: Log
    images: object                # the pretraining images (after --train_subset)
    bad_images: list              # unreadable files skipped with --skip_bad_images
    run: Optional[RunDir]         # the run folder (main process only)
    knn_sets: Optional[tuple] = None


def resume_point(cfg: PretrainConfig, log: Log) -> tuple[Optional[Path], str]:
    """The checkpoint to continue from (None: start at step 0; else pinned against pruning, see
    :func:`simclr.checkpoint.pin`) and the run folder to write into ('' : a new one).

    A run folder's identity is its location: ``--resume RUN`` continues RUN in place, from its newest valid
    checkpoint, or, before it saved one, from the checkpoint it branched from (its recorded ``ckpt``). A
    checkpoint given with ``--ckpt`` starts a new run folder (its path recorded as ``ckpt`` in config.yaml) unless
    it lies in the run being resumed (``--resume`` / ``--run_dir``): branching never writes into the original."""
    run = resumed_run(cfg, log)
    if run is not None:
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


# options that change where a run goes: a resume that changes them is a different run unless allowed
TRAJECTORY = ("iters", "batch_size", "lr", "lr_schedule", "warmup", "opt", "weight_decay", "temperature",
              "multiplier", "arch", "width", "width_multiplier", "timm_kwargs", "data", "data_path", "train_subset",
              "aug", "scale_lower", "color_dist_s", "blur", "blur_sigma", "lr_scaling", "seed")


def config_changes(saved: dict, cfg: PretrainConfig) -> dict:
    """{key: (checkpoint's value, this run's value)} for the trajectory keys that differ."""
    return {k: (saved[k], getattr(cfg, k)) for k in TRAJECTORY
            if k in saved and hasattr(cfg, k) and saved[k] != getattr(cfg, k)}


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
    for key in ("arch", "width", "timm_kwargs", "proj_layers", "proj_dim"):  # what the weights' shapes depend on
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
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise UserError(f"resuming {path} with options that change the run: {listed}. Resume with the run's own "
                        f"config (simclr pretrain --resume RUN_DIR), or pass --allow_config_change true")
    for k, (old, new) in changes.items():
        log.warn(f"warning: {path} was trained with {k}={old!r}, this run continues with {k}={new!r} "
                 f"(--allow_config_change)")
    ck["config_changes"] = {k: list(v) for k, v in changes.items()}
    return ck


def restore(p: Parts, st: State, ck: dict, path: Path, log: Log, rank: int = 0) -> None:
    try:
        p.model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit this model: {str(e).splitlines()[0]}") from None
    p.optimizer.load_state_dict(ck["optimizer"])
    if p.probe is not None:
        if ck.get("probe"):
            p.probe.load_state_dict(ck["probe"])
        else:
            log(f"note: {path} has no online probe: this run's probe starts from zero at step {ck['step']}")
    if ck.get("scaler"):
        p.scaler.load_state_dict(ck["scaler"])
    if ck.get("rng") and (note := set_rng_state(ck["rng"], p.device, rank)):
        log(note)
    st.step = st.saved_step = int(ck["step"])
    st.nan_skips = int(ck.get("nan_skips", 0))
    if isinstance(ck.get("metrics"), dict):  # the kNN so far (best, at init, last): a finished run needs no rerun
        st.metrics = dict(ck["metrics"])
    log(f"resumed from {path} at step {st.step}")


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
    resume_from, run_dir = resume_point(cfg, log)
    ck = read_resume(resume_from, cfg, seed_drawn, log) if resume_from is not None else None
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    seed_everything(cfg.seed + dist.rank)
    images = get_dataset(cfg.data, "pretrain", cfg.data_path, cfg.image_size, cfg.skip_bad_images)
    # grows while reading when workers == 0
    bad_images = getattr(images, "bad_images", None) or []
    images = maybe_subset(images, cfg.train_subset, seed=0)
    parts = build(cfg, images, device, dist.rank, dist.world)
    state = State()
    if ck is not None:
        restore(parts, state, ck, resume_from, log, dist.rank)
    distributed.check_same(state.step, "the step to resume from")
    tune_backends(device, cfg.deterministic)
    wrap(parts, cfg, dist.enabled, warn=log.warn)
    run = None
    if dist.is_main:
        run = RunDir.create(cfg.root, cfg.name, run_dir)
        log.attach(run)
        if ck is not None and ck["config_changes"]:  # --allow_config_change: what changed, and when
            append_line(run.path / "config_history.jsonl", json.dumps(
                {"time": time.time(), "step": state.step, "changes": ck["config_changes"]}, default=str) + "\n")
        config_lib.save(cfg, run.path / "config.yaml", run_dir="")  # its location is its identity: not recorded
        run.record_environment(environment(str(device)))
        run.track(cfg.logger, config_lib.to_dict(cfg), cfg.name, cfg.mlflow_uri, warn=log.warn)
        if run.trackers.live:
            log(f"trackers: {run.trackers.describe()}")
        run.set_status("running", step=state.step, iters=cfg.iters)
    return Session(cfg, dist, parts, state, log, images, bad_images, run)


def save(s: Session) -> Optional[Path]:
    cfg, p, st = s.cfg, s.parts, s.state
    cuda_rng = distributed.all_gather_object(cuda_rng_state(p.device))  # every rank: each its own device's
    if s.run is None:
        return None
    path = ckpt_lib.checkpoint_path(s.run.path, st.step)
    if st.saved_step == st.step and path.exists():
        return path  # saved at this step already (e.g. save_freq then stop): no second write
    epochs = st.step / max(p.loader.steps_per_epoch, 1)
    payload = {"kind": "pretrain", "step": st.step, "image_size": s.images.image_size,
               "config": config_lib.to_dict(cfg), "model": ckpt_lib.model_state(p.model),
               "optimizer": p.optimizer.state_dict(), "scaler": p.scaler.state_dict(), "rng": rng_state(cuda_rng),
               "metrics": st.metrics, "nan_skips": st.nan_skips}
    if p.probe is not None:
        payload["probe"] = p.probe.state_dict()
    card = {"arch": cfg.arch, "width": p.model.width, "timm_kwargs": p.model.timm_kwargs, "data": cfg.data,
            "image_size": s.images.image_size,
            "iters": cfg.iters, "epochs": epochs, "metrics": st.metrics}
    ckpt_lib.save_checkpoint(path, payload, card)
    st.saved_step = st.step
    ckpt_lib.prune(s.run.path, cfg.keep_last)
    return path
