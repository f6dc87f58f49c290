"""The pretraining loop: batches from ``parts.loader``, :func:`~simclr.train.step.train_step`, and at its log, kNN
and save points the step line, the kNN monitor and the checkpoint. The step's guard decides what happens to a
non-finite step; the loop records it (:func:`record_skip`, :func:`stop_if_diverged`: log, metrics.jsonl, status).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from .. import distributed
from ..errors import UserError
from ..evaluate.monitor import knn_monitor
from ..progress import Progress, hms, rate
from ..runtime import describe_compute
from .resume import save
from .session import Session
from .step import train_step

log = logging.getLogger(__name__)


def _due(step: int, every: int, iters: int) -> bool:
    return bool(every) and step % every == 0 and step != iters


def loop(s: Session, should_stop: Callable[[], bool]) -> dict:
    """Steps ``s.step`` to ``--iters`` (or until ``should_stop()``, asked after each step, or ``--stop_after``), then
    the final kNN, checkpoint, summary and status -> the final metrics, step, status and run folder."""
    cfg, p = s.cfg, s.parts
    announce(s)
    if cfg.eval_at_start and s.step == 0:
        monitor(s, at_start=True)
    distributed.barrier()
    p.model.train()
    speed, status = Speed(cfg.batch_size, s.step), "finished"
    stop_at = min(cfg.iters, s.step + cfg.stop_after) if cfg.stop_after else cfg.iters
    done_before = s.step >= cfg.iters and "knn_top1" in s.metrics  # a finished run resumed: nothing to redo
    bar = progress_bar(s)
    for x, y in speed.timed(p.loader.batches(s.step, cfg.iters)):
        loss, acc, updated = train_step(p, x, s.step, y=y)
        if not updated:
            record_skip(s)
        s.step += 1
        log_now = s.step % cfg.log_freq == 0 or s.step == cfg.iters
        eval_now, save_now = _due(s.step, cfg.eval_freq, cfg.iters), _due(s.step, cfg.save_freq, cfg.iters)
        if log_now or eval_now or save_now:  # nothing is logged, evaluated or saved after a non-finite step
            stop_if_diverged(s)
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
    stop_if_diverged(s)
    if status == "finished" and not done_before:
        monitor(s)
    written_before = s.saved_step == s.step
    path = save(s)
    if path is not None and not written_before:
        log.info(f"saved checkpoint {path}")
    return dict(s.metrics, step=s.step, status=status, run_dir=str(s.run.path) if s.run else "")


def progress_bar(s: Session) -> Progress:
    """A bar on a terminal; under SLURM or a pipe the log lines are the progress, and a line with the step and
    ETA when they have been silent for a while (a long --log_freq)."""
    return Progress(s.cfg.iters, "pretrain", s.dist.is_main and s.cfg.verbose, initial=s.step)


def record_skip(s: Session) -> None:
    """``--on_nan skip``: a step the guard skipped still counts (schedule, data order, logging, checkpoints go on)."""
    s.nan_skips += 1
    log.info(f"non-finite loss or gradient at step {s.step}: step skipped")
    if s.run:
        s.run.log_metrics({"step": s.step, "event": "nan", "action": "skip"})


def stop_if_diverged(s: Session) -> None:
    """``--on_nan stop``, at a log, eval or save point and at the end: after a non-finite step, fail with the last
    good checkpoint untouched (a collective: every rank calls it at the same steps)."""
    first_bad = s.parts.guard.first_bad()
    if first_bad < 0:
        return
    s.step = first_bad  # steps completed with finite values: the state is that of checkpoint first_bad
    msg = f"non-finite loss or gradient at step {first_bad}"
    log.info(msg)
    if s.run:
        s.run.log_metrics({"step": first_bad, "event": "nan", "action": "stop"})
        s.run.set_status("failed", step=first_bad, error=f"{msg}; last good checkpoint kept; lower --lr or use "
                                                         f"--on_nan skip")
    raise UserError(f"{msg}: training stopped, the last good checkpoint is untouched. Lower --lr, or pass "
                    f"--on_nan skip.")


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
    log.info(f"step {s.step}/{s.cfg.iters} epoch {rec['epoch']:.2f} loss {loss_v:.4f} contrast_acc {acc_v:.3f}{probe} "
             f"lr {rec['lr']:.4g} {rate(images_per_s)} img/s data {100 * data_frac:.0f}%{mem} "
             f"elapsed {hms(elapsed)} eta {hms(eta)}")


def monitor(s: Session, at_start: bool = False) -> dict:
    """The kNN monitor on every rank (each embeds its share); the main process records it."""
    cfg, p = s.cfg, s.parts
    log.info(f"step {s.step}: kNN monitor: embedding {len(s.knn_sets[0])} training and {len(s.knn_sets[1])} test "
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
        log.info(f"step {s.step}{' (random init)' if at_start else ''}: kNN top-1 {res['knn_top1']:.2f}%  "
                 f"top-5 {res['knn_top5']:.2f}%")
    distributed.barrier()
    return res


def announce(s: Session) -> None:
    cfg = s.cfg
    if s.step >= cfg.iters:
        log.info(f"nothing to do: the run is already at step {s.step} of {cfg.iters} (to train longer, resume it with "
                 f"a larger --iters and --allow_config_change true)")
        return
    what = s.parts.model.name + (f" (width {cfg.width})" if s.parts.model.width % 64 else "")
    log.info(f"pretraining {what} on {cfg.data} ({len(s.images)} images, "
             f"{s.images.image_size}px), batch {cfg.batch_size} x {cfg.multiplier} views, {cfg.iters} steps "
             f"({cfg.iters / max(s.parts.loader.steps_per_epoch, 1):.1f} epochs), {s.parts.device}, "
             f"{s.dist.world} process(es), {describe_compute(s.parts.amp_dtype, s.parts.channels_last, s.parts.device)}"
             + (f"; run folder {s.run.path}" if s.run else ""))
    if s.bad_images:
        s.metrics["skipped_images"] = len(s.bad_images)
        log.warning(f"warning: skipped {len(s.bad_images)} unreadable image file(s), e.g. {s.bad_images[0]}")
