"""Where a pretraining run continues from, and what it leaves to continue from: :func:`resume_point` (the
checkpoint and run folder ``--resume``/``--ckpt``/``--run_dir`` name), :func:`read_resume` (the checkpoint must fit
this run: its weight shapes, and the options that set the trajectory, unless ``--allow_config_change``),
:func:`restore` (weights, optimizer, RNG, step and metrics into the session) and :func:`save` (the checkpoint that
a later :func:`read_resume` reads). What a resume checks of its images is :mod:`.data_identity`."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from .. import checkpoint as ckpt_lib
from .. import config as config_lib
from .. import distributed
from ..errors import UserError
from ..options import PretrainConfig
from ..rundir import check_kind, check_run_folder, find_run_dir, hold_lock, is_run, newest_run
from ..runtime import cuda_rng_state, rng_state, set_rng_state
from .resume_message import changes_message
from .session import Session

log = logging.getLogger(__name__)


# How long the last save of a run waits for readers (simclr knn/eval/report hold a checkpoint's pin only while they
# read it: seconds) before it leaves their checkpoints beyond --keep_last in place, with a warning.
FINAL_PRUNE_WAIT_S = 60.0

def resume_point(cfg: PretrainConfig, lock: bool = False) -> tuple[Optional[Path], str]:
    """The checkpoint to continue from (None: start at step 0; else pinned against pruning, see
    :func:`simclr.checkpoint.pin`) and the run folder to write into ('' : a new one).

    A run folder's identity is its location: ``--resume RUN`` continues RUN in place, from its newest valid
    checkpoint, or, before it saved one, from the checkpoint it branched from (its recorded ``ckpt``). A
    checkpoint given with ``--ckpt`` starts a new run folder (its path recorded as ``ckpt`` in config.yaml) unless
    it lies in the run being resumed (``--resume`` / ``--run_dir``): branching never writes into the original.
    With ``lock`` (the main process) an existing run folder to write is locked before its checkpoints are read."""
    run = resumed_run(cfg)
    if run is not None:
        if lock:
            hold_lock(run)
        chosen = ckpt_lib.resolve(cfg.ckpt) if cfg.ckpt else None
        if chosen is not None and _inside(chosen, run):  # a chosen checkpoint of this very run
            return (chosen if ckpt_lib.pin(chosen) else None), str(run)
        path = ckpt_lib.latest_valid(run)
        if path is None and chosen is not None:  # branched from `chosen`, stopped before its first save
            ckpt_lib.pin(chosen)
            path = chosen
        if path is None:
            log.info(f"note: no valid checkpoint in {run}; starting it from step 0")
        return path, str(run)
    if cfg.ckpt:
        path = ckpt_lib.resolve(cfg.ckpt)
        origin = find_run_dir(path)
        if cfg.run_dir and origin is not None and _same(Path(cfg.run_dir), origin):
            if lock:
                hold_lock(Path(cfg.run_dir))
            return (path if ckpt_lib.pin(path) else None), cfg.run_dir
        cfg.ckpt = str(Path(path).resolve())  # the new run's origin, recorded in its config.yaml
        if origin is not None:
            log.info(f"note: starting a new run folder from {cfg.ckpt} (its run folder {origin} is left as it is; "
                     f"to continue that run use --resume {origin})")
        ckpt_lib.pin(path)
        return path, cfg.run_dir
    if cfg.run_dir:
        _check_pretrain_folder(Path(cfg.run_dir))
    return None, cfg.run_dir


def resumed_run(cfg: PretrainConfig) -> Optional[Path]:
    """The run folder ``--resume`` names (None: none, or ``auto`` found none)."""
    if cfg.resume == "auto":
        if cfg.run_dir:
            run = Path(cfg.run_dir)
            _check_pretrain_folder(run)
            return run if run.is_dir() else None
        run = newest_run(Path(cfg.root) / cfg.name, "pretrain")
        if run is None:
            log.info(f"note: no pretraining run under {Path(cfg.root) / cfg.name}; starting from step 0")
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


def read_resume(path: Path, cfg: PretrainConfig, seed_drawn: bool) -> dict:
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
        log.warning(f"warning: {path} was trained with {k}={old!r}, this run continues with {k}={new!r} "
                    f"(--allow_config_change)")
    ck["config_changes"] = {k: list(v) for k, v in changes.items()}
    return ck


def restore(s: Session, ck: dict, path: Path) -> None:
    """The checkpoint ``ck`` (read from ``path`` by :func:`read_resume`) into the session: weights, optimizer,
    probe, scaler, RNG, step and metrics."""
    p = s.parts
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
            log.info(f"note: {path} has no online probe: this run's probe starts from zero at step {ck['step']}")
    if ck.get("scaler"):
        p.scaler.load_state_dict(ck["scaler"])
    saved_compute = ck.get("compute")
    if isinstance(saved_compute, dict) and saved_compute != p.compute:  # e.g. moved to a CPU without bf16
        log.info(f"note: {path} was trained with {_compute_text(saved_compute)}; this run continues with "
                 f"{_compute_text(p.compute)} (--precision and --channels_last resolve per machine; the run goes on "
                 f"from the same weights, a little apart numerically from an uninterrupted one)")
    if ck.get("rng") and (note := set_rng_state(ck["rng"], p.device, s.dist.rank)):
        log.info(note)
    s.step = s.saved_step = int(ck["step"])
    s.nan_skips = int(ck.get("nan_skips", 0))
    if isinstance(ck.get("metrics"), dict):  # the kNN so far (best, at init, last): a finished run needs no rerun
        s.metrics = dict(ck["metrics"])
    log.info(f"resumed from {path} at step {s.step}")


def _compute_text(compute: dict) -> str:
    return f"{compute.get('precision')}, {'channels_last' if compute.get('channels_last') else 'NCHW'}"


def save(s: Session) -> Optional[Path]:
    """The checkpoint of step ``s.step`` (the main process writes it, then prunes to ``--keep_last``); its path, None
    on the other ranks. A collective: every rank gathers its CUDA RNG state first."""
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
    last = s.step >= cfg.iters  # no later save of this run would prune what a reader holds now
    held = ckpt_lib.prune(s.run.path, cfg.keep_last, wait_s=FINAL_PRUNE_WAIT_S if last else 0.0)
    if held and last:
        log.warning(f"kept {len(held)} checkpoint(s) beyond --keep_last {cfg.keep_last} that another process was "
                    f"still reading after {FINAL_PRUNE_WAIT_S:g} s: {', '.join(p.name for p in held)}; delete them "
                    f"by hand once it is done (with their .json cards)")
    return path
