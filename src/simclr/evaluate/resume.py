"""The SGD linear evaluation's head checkpoints in its run folder, and continuing it (``simclr eval --resume``).

Every ``--save_freq`` steps (the newest ``--keep_last`` kept) and every ``--ckpt_iter`` steps (all kept), and when
the job is asked to stop (SIGTERM/SIGINT, ``--stop_after``), ``checkpoints/linear-head-<step>.pt`` is written
atomically with its card (:func:`simclr.linear.save_head`, :func:`simclr.checkpoint.save_checkpoint`): an ordinary
head (``--eval_only true --ckpt`` scores it) that also holds what the loop needs to go on (``resume``: optimizer,
loss scaler, the training split's identity), and the fine-tuned encoder when fine-tuning. The final head
(``linear-head.pt``, ``finetuned.pt``) holds the same. Which rows or images a step draws, and their augmentations,
are functions of (seed, step) (:mod:`.linear`), so a resumed evaluation ends with the head of an uninterrupted
one, bit for bit on a CPU.

A resume continues only the same evaluation: the same options of role ``trajectory``
(:class:`~simclr.eval_options.EvalConfig`), the same encoder file content (SHA-256), training images (content
fingerprint), classes and input size; anything else is refused with one line before the run folder is touched
(an ``interrupted`` one is marked ``failed``, so a requeue loop stops).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import checkpoint as ckpt_lib
from .. import config as config_lib
from ..errors import CheckpointError, UserError
from ..eval_options import EvalConfig
from ..files import read_small_json
from ..rundir import MAX_RUN_JSON, RunDir, check_run_folder, folder_kind, hold_lock, is_run, newest_run
from .linear import Fit, save_head

log = logging.getLogger(__name__)

HEAD_RE = re.compile(r"^linear-head-(\d+)\.pt\Z")  # the periodic heads (the whole name)
FINAL_HEADS = ("linear-head.pt", "finetuned.pt")


class Stopped(Exception):
    """The SGD loop stopped after step ``step`` (a signal, ``--stop_after``), its state saved in ``path``."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"stopped at step {step}")
        self.step, self.path = step, path


def resumable(cfg: EvalConfig) -> bool:
    """Whether this evaluation trains the SGD linear head: the one protocol with steps to continue."""
    return not cfg.eval_only and (cfg.protocol == "linear" or cfg.compare)


# --------------------------------------------------------------------------------------------
# where a resume continues from (before any data is read; the run folder locked first)
# --------------------------------------------------------------------------------------------
@dataclass
class ResumePoint:
    run: Optional[Path] = None    # the run folder continued (None: a new one)
    path: Optional[Path] = None   # its newest head checkpoint with a resume state (None: from step 0)
    ck: Optional[dict] = None     # that checkpoint's content


def resume_point(cfg: EvalConfig) -> ResumePoint:
    """The run folder ``--resume`` names, locked (:func:`simclr.rundir.hold_lock`) before its newest head
    checkpoint is chosen and read; a drawn seed (``--seed -1``) becomes the evaluation's own."""
    run = _resumed_run(cfg)
    if run is None:
        return ResumePoint()
    hold_lock(run)
    path, ck = _newest_state(run)
    if path is None:
        log.info(f"note: {run} holds no head checkpoint to continue from; starting it from step 0")
        return ResumePoint(run)
    seed = (ck.get("config") or {}).get("seed")
    if cfg.seed < 0 and isinstance(seed, int) and seed >= 0:  # which images a step draws follows the seed
        cfg.seed = seed
    return ResumePoint(run, path, ck)


def _resumed_run(cfg: EvalConfig) -> Optional[Path]:
    if not cfg.resume:
        return None
    if not resumable(cfg):
        what = "--eval_only true" if cfg.eval_only else f"--protocol {cfg.protocol}"
        raise UserError(f"--resume continues the SGD linear evaluation (--protocol linear); {what} has no steps to "
                        f"continue: run it again without --resume")
    if cfg.resume == "auto":
        if cfg.run_dir:  # continued when it is an evaluation, else started there
            return _checked(Path(cfg.run_dir)) if is_run(Path(cfg.run_dir)) else None
        run = newest_run(Path(cfg.root) / cfg.name, "eval")
        if run is None or _status(run) == "finished":  # a name holds the evaluations of many encoders
            log.info(f"note: no unfinished evaluation under {Path(cfg.root) / cfg.name}; starting a new one")
            return None
        return _checked(run)
    run = Path(cfg.resume)
    if not run.is_dir():
        raise UserError(f"--resume takes an evaluation's run folder or 'auto', got {config_lib.shown(cfg.resume)}: "
                        f"no such folder")
    if not is_run(run):
        inside = newest_run(run, "eval")
        hint = f"; it holds evaluations, the newest is {inside}: --resume {inside}" if inside is not None else ""
        raise UserError(f"--resume {run}: not a run folder (no config.yaml or status.json in it){hint}")
    if cfg.run_dir and Path(cfg.run_dir).resolve() != run.resolve():
        raise UserError(f"--resume continues {run} in place, but --run_dir names {cfg.run_dir}; leave --run_dir out")
    return _checked(run)


def _status(run: Path) -> str:
    status = read_small_json(run / "status.json", MAX_RUN_JSON)
    return status.get("status", "") if isinstance(status, dict) else ""


def _checked(run: Path) -> Path:
    check_run_folder(run)
    kind = folder_kind(run)
    if kind != "eval":
        raise UserError(f"--resume {run}: a {kind} run folder, not a linear evaluation; to evaluate a pretraining run "
                        f"pass it as --encoder_ckpt")
    return run


def _newest_state(run: Path) -> tuple[Optional[Path], Optional[dict]]:
    """The final head, else the newest periodic one, that reads, checks out and holds a resume state; others are
    skipped with a warning (one pruned while looked at, in silence)."""
    finals = [run / "checkpoints" / n for n in FINAL_HEADS if (run / "checkpoints" / n).is_file()]
    for p in finals + ckpt_lib.list_checkpoints(run, HEAD_RE):
        if not ckpt_lib.pin(p):
            continue
        try:
            ck = ckpt_lib.read(p)
            if ck.get("format") == ckpt_lib.FORMAT and ck.get("kind") == "linear" and isinstance(ck.get("resume"),
                                                                                                   dict):
                return p, ck
            log.warning(f"warning: skipping {p.name}: no state to continue from (written before evaluations resumed)")
        except CheckpointError as e:
            if p.exists():
                log.warning(f"warning: skipping {p.name}: {e}")
        finally:
            ckpt_lib.unpin(p)
    return None, None


def check_fits(point: ResumePoint, cfg: EvalConfig, inp, train_fingerprint: Optional[str]) -> None:
    """Refuse, in one line, to continue another evaluation than the checkpoint's: options of role ``trajectory``,
    the encoder file's content, the training images, the classes or the input size changed."""
    if point.ck is None:
        return
    ck, saved = point.ck, point.ck.get("config") or {}
    changes = {k: (saved[k], getattr(cfg, k)) for k in config_lib.with_role(EvalConfig, "trajectory")
               if k in saved and saved[k] != getattr(cfg, k)}
    if ck.get("encoder_sha256", "") != inp.encoder_hash:
        changes["encoder sha256"] = (ck.get("encoder_sha256", "")[:12] or "random init",
                                     inp.encoder_hash[:12] or "random init")
    was = ck["resume"].get("train_fingerprint")
    if was and train_fingerprint and was != train_fingerprint:
        changes["training images"] = (was, train_fingerprint)
    for key, now in (("image_size", inp.image_size), ("classes", inp.classes)):
        if key in ck and ck[key] != now:
            changes[key] = (ck[key], now)
    if changes:
        listed = "; ".join(f"{k}: {config_lib.shown(old)} -> {config_lib.shown(new)}" for k, (old, new) in
                           changes.items())
        raise UserError(f"resuming {point.path}: that would be another evaluation ({listed}); continue it with what "
                        f"it was started with (leave the changed options out), or start a new one without --resume")


def record_refusal(run: Optional[Path], error: Exception) -> None:
    """A refused resume of an ``interrupted`` evaluation marks it ``failed`` with the error (a requeue loop that
    requeues while it is ``interrupted`` stops); any other status is left as it is."""
    if run is None or _status(run) != "interrupted":
        return
    old = read_small_json(run / "status.json", MAX_RUN_JSON)
    try:
        rd = RunDir(run, tensorboard=False, kind="eval")  # takes over the lock resume_point holds
    except (UserError, OSError):
        return
    try:
        anew = ("status", "kind", "pid", "host", "updated", "started", "train_s", "error")  # RunDir.set_status's
        rd.set_status("failed", **{k: v for k, v in (old or {}).items() if k not in anew},
                      error=f"{type(error).__name__}: {error}")
    except (UserError, OSError):
        pass
    finally:
        rd.close()


# --------------------------------------------------------------------------------------------
# the heads in the run folder
# --------------------------------------------------------------------------------------------
def head_info(cfg: EvalConfig, inp, iters: int, fit: str, metrics: dict) -> dict:
    return {"iters": iters, "fit": fit, "config": config_lib.to_dict(cfg), "encode_layer": inp.layer,
            "encoder_sha256": inp.encoder_hash, "encoder_ckpt": cfg.encoder_ckpt, "classes": inp.classes,
            "image_size": inp.image_size, "metrics": metrics}


def result_metrics(res: dict) -> dict:
    return {"top1": res["top1"], "top5": res["top5"], "n_test": res["n"]}


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


class HeadCheckpoints:
    """The SGD loop's checkpoints (see the module docstring), as the hooks of :func:`.linear.train_on_features` and
    :func:`.linear.train_on_images`: :meth:`start` restores the resume point's state, :meth:`after_step` saves when
    due and, asked to stop (``should_stop``, ``--stop_after``), saves and raises :class:`Stopped`. ``started`` is
    called as the steps begin (the entry point: from then on a signal waits for the step)."""

    def __init__(self, cfg: EvalConfig, inp, run: RunDir, point: Optional[ResumePoint] = None,
                 should_stop: Callable[[], bool] = lambda: False, started: Callable[[], None] = lambda: None,
                 train_fingerprint: Optional[str] = None):
        self.cfg, self.inp, self.run = cfg, inp, run
        self.point = point or ResumePoint()
        self.should_stop, self.started, self.fingerprint = should_stop, started, train_fingerprint
        self.fit: Optional[Fit] = None
        self.stop_at = cfg.iters

    def start(self, fit: Fit) -> None:
        if self.point.ck is not None:
            _restore(fit, self.point.ck, self.point.path, self.inp)
            log.info(f"resumed from {self.point.path} at step {fit.step}")
        self.fit = fit
        if self.cfg.stop_after:
            self.stop_at = min(self.cfg.iters, fit.step + self.cfg.stop_after)
        self.started()

    def after_step(self, fit: Fit) -> None:
        cfg, step = self.cfg, fit.step
        if step >= cfg.iters:
            return
        if self.should_stop() or step >= self.stop_at:
            raise Stopped(step, self.save(fit))
        if _due(step, cfg.save_freq) or _due(step, cfg.ckpt_iter):
            self.save(fit)
            self.run.log_metrics({"step": step, "event": "head_checkpoint"})

    def save(self, fit: Fit, name: str = "", metrics: Optional[dict] = None) -> Path:
        """``fit`` with its resume state into ``checkpoints/name`` (default ``linear-head-<step>.pt``, then
        pruned to the newest ``--keep_last`` of them and those of ``--ckpt_iter``)."""
        cfg = self.cfg
        path = self.run.path / "checkpoints" / (name or f"linear-head-{fit.step:08d}.pt")
        info = head_info(cfg, self.inp, fit.step, "linear", metrics or {})
        info["resume"] = {"optimizer": fit.optimizer.state_dict(), "train_fingerprint": self.fingerprint,
                          "scaler": fit.scaler.state_dict() if fit.scaler is not None else None}
        save_head(path, fit.head, info, self.inp.encoder.model.state_dict() if fit.encoder is not None else None)
        if not name:
            ckpt_lib.prune(self.run.path, cfg.keep_last, HEAD_RE, keep=lambda step: _due(step, cfg.ckpt_iter))
        return path

    def final(self, res: dict) -> Path:
        """The trained head with its accuracy: ``linear-head.pt`` (``finetuned.pt`` with its encoder)."""
        return self.save(self.fit, FINAL_HEADS[self.fit.encoder is not None], result_metrics(res))


def _restore(fit: Fit, ck: dict, path: Path, inp) -> None:
    sd, state = ck.get("state_dict") or {}, ck["resume"]
    weight, bias = sd.get("weight"), sd.get("bias")
    if not (isinstance(weight, torch.Tensor) and weight.shape == fit.head.weight.shape and
            isinstance(bias, torch.Tensor) and bias.shape == fit.head.bias.shape):
        raise CheckpointError(f"{path}: its head does not fit this evaluation's ({ckpt_lib.describe(sd)}); start a "
                              f"new evaluation without --resume")
    with torch.no_grad():
        fit.head.weight.copy_(weight)
        fit.head.bias.copy_(bias)
    if fit.encoder is not None:
        ckpt_lib.load_weights(inp.encoder.model, ck.get("encoder"), f"{path} (its fine-tuned encoder)",
                              "start a new evaluation without --resume")
    try:
        fit.optimizer.load_state_dict(state["optimizer"])
        if fit.scaler is not None and state.get("scaler"):
            fit.scaler.load_state_dict(state["scaler"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit this evaluation ({e}); start a new "
                              f"evaluation without --resume") from None
    fit.step = int(ck["step"])
