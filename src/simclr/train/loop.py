"""The pretraining loop, counted in optimizer steps.

Everything that depends on time (learning rate, which images a step draws, their augmentations, the kNN
schedule) is a function of the global step, so a resumed run continues the same trajectory. Signals belong
to the caller: :func:`pretrain` only asks ``should_stop()`` after each step, then saves and stops.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .. import distributed
from ..data import get_dataset, maybe_subset
from ..errors import UserError
from ..evaluate.monitor import knn_monitor
from ..models import build_model
from ..options import PretrainConfig
from ..progress import Progress, hms, rate
from ..runtime import autocast_dtype, resolve_device
from .session import Session, save, setup
from .step import DivergenceGuard, train_step


# --------------------------------------------------------------------------------------------
# what the loop calls at log, eval and save points
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
    st = s.state
    loss_v = distributed.all_reduce_mean(loss).item()
    acc_v = distributed.all_reduce_mean(acc).item()
    images_per_s, data_frac = speed.lap()
    rec = {"step": st.step, "epoch": st.step / s.parts.loader.steps_per_epoch, "loss": loss_v,
           "contrast_acc": acc_v, "lr": float(s.parts.lrs[st.step - 1]), "images_per_s": images_per_s,
           "data_time_frac": data_frac, "nan_skips": st.nan_skips, "skipped_images": len(s.bad_images)}
    probe = ""
    if s.parts.probe is not None:
        top1 = s.parts.probe.window_top1()  # a collective, like the means above
        if top1 is not None:
            rec["online_linear_top1"] = st.metrics["online_linear_top1"] = top1
            probe = f" probe {top1:.1f}%"
    st.metrics.update(loss=loss_v, contrast_acc=acc_v)
    if s.run:
        s.run.log_metrics(rec)
        s.run.heartbeat(step=st.step)
    bar.set_postfix(loss=f"{loss_v:.3f}", acc=f"{acc_v:.3f}")
    elapsed, eta = speed.elapsed_and_eta(st.step, s.cfg.iters)
    mem = ""
    if s.parts.device.type == "cuda":
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(s.parts.device) / 2 ** 30
        mem = f" mem {rec['peak_mem_gib']:.1f} GiB"
    s.log(f"step {st.step}/{s.cfg.iters} epoch {rec['epoch']:.2f} loss {loss_v:.4f} contrast_acc {acc_v:.3f}{probe} "
          f"lr {rec['lr']:.4g} {rate(images_per_s)} img/s data {100 * data_frac:.0f}%{mem} "
          f"elapsed {hms(elapsed)} eta {hms(eta)}")


def monitor(s: Session, at_start: bool = False) -> dict:
    """The kNN monitor on every rank (each embeds its share); the main process records it."""
    cfg, p, st = s.cfg, s.parts, s.state
    if s.knn_sets is None:  # the same training images as pretraining when a subset is asked for
        s.knn_sets = tuple(maybe_subset(get_dataset(cfg.data, split, cfg.data_path, cfg.image_size,
                                                    cfg.skip_bad_images), n, seed=0)
                           for split, n in (("train", cfg.train_subset), ("test", cfg.test_subset)))
    s.log(f"step {st.step}: kNN monitor: embedding {len(s.knn_sets[0])} training and {len(s.knn_sets[1])} test "
          f"images{' (random init)' if at_start else ''}")
    res = knn_monitor(p.model.convnet, *s.knn_sets, s.images.image_size, p.device, p.amp_dtype,
                      cfg.knn_k, cfg.knn_t, progress=s.dist.is_main and cfg.verbose)
    if s.dist.is_main:
        if at_start:
            st.metrics["knn_start_top1"] = res["knn_top1"]
        else:
            st.metrics.update(res)
            st.metrics["best_knn_top1"] = max(st.metrics.get("best_knn_top1", 0.0), res["knn_top1"])
        if s.run:
            s.run.log_metrics({"step": st.step, "epoch": st.step / p.loader.steps_per_epoch, **res})
        s.log(f"step {st.step}{' (random init)' if at_start else ''}: kNN top-1 {res['knn_top1']:.2f}%  "
              f"top-5 {res['knn_top5']:.2f}%")
    distributed.barrier()
    return res


def stop_if_diverged(s: Session, guard: DivergenceGuard) -> None:
    """With --on_nan stop: after a non-finite step, fail with the last good checkpoint untouched."""
    first_bad = guard.first_bad()
    if first_bad < 0:
        return
    s.state.step = first_bad  # steps completed with finite values: the state is that of checkpoint first_bad
    msg = f"non-finite loss or gradient at step {first_bad}"
    s.log(msg)
    if s.run:
        s.run.log_metrics({"step": first_bad, "event": "nan", "action": "stop"})
        s.run.set_status("failed", step=first_bad, error=f"{msg}; last good checkpoint kept; lower --lr or use "
                                                         f"--on_nan skip")
    raise UserError(f"{msg}: training stopped, the last good checkpoint is untouched. Lower --lr, or pass "
                    f"--on_nan skip.")


def record_skip(s: Session) -> None:
    """A step the guard skipped still counts (schedule, data order, logging, checkpoints go on)."""
    s.state.nan_skips += 1
    s.log(f"non-finite loss or gradient at step {s.state.step}: step skipped")
    if s.run:
        s.run.log_metrics({"step": s.state.step, "event": "nan", "action": "skip"})


def announce(s: Session) -> None:
    cfg, st = s.cfg, s.state
    if st.step >= cfg.iters:
        s.log(f"nothing to do: already at step {st.step} of {cfg.iters}")
    what = s.parts.model.name + (f" (width {cfg.width})" if s.parts.model.width % 64 else "")
    s.log(f"pretraining {what} on {cfg.data} ({len(s.images)} images, "
          f"{s.images.image_size}px), batch {cfg.batch_size} x {cfg.multiplier} views, {cfg.iters} steps "
          f"({cfg.iters / max(s.parts.loader.steps_per_epoch, 1):.1f} epochs), {s.parts.device}, "
          f"{s.dist.world} process(es)" + (f"; run folder {s.run.path}" if s.run else ""))
    if s.bad_images:
        st.metrics["skipped_images"] = len(s.bad_images)
        s.log.warn(f"warning: skipped {len(s.bad_images)} unreadable image file(s), e.g. {s.bad_images[0]}")


def _due(step: int, every: int, iters: int) -> bool:
    return bool(every) and step % every == 0 and step != iters


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
def loop(s: Session, should_stop: Callable[[], bool]) -> dict:
    cfg, p, st = s.cfg, s.parts, s.state
    announce(s)
    if cfg.eval_at_start and st.step == 0:
        monitor(s, at_start=True)
    distributed.barrier()
    p.model.train()
    guard, speed, status = DivergenceGuard(cfg.on_nan, p.device), Speed(cfg.batch_size, st.step), "finished"
    stop_at = min(cfg.iters, st.step + cfg.stop_after) if cfg.stop_after else cfg.iters
    done_before = st.step >= cfg.iters and "knn_top1" in st.metrics  # a finished run resumed: nothing to redo
    bar = progress_bar(s)
    for x, y in speed.timed(p.loader.batches(st.step, cfg.iters)):
        loss, acc, updated = train_step(p, cfg, x, st.step, guard, y=y)
        if not updated:
            record_skip(s)
        st.step += 1
        bar.update(1)
        if st.step % cfg.log_freq == 0 or st.step == cfg.iters:
            stop_if_diverged(s, guard)
            log_step(s, loss, acc, speed, bar)
        if _due(st.step, cfg.eval_freq, cfg.iters):
            stop_if_diverged(s, guard)
            monitor(s)
        if _due(st.step, cfg.save_freq, cfg.iters):
            stop_if_diverged(s, guard)
            save(s)
        if st.step < cfg.iters and (should_stop() or st.step >= stop_at):
            status = "interrupted"
            break
    bar.close()
    stop_if_diverged(s, guard)
    if status == "finished" and not done_before:
        monitor(s)
    path = save(s)
    if path is not None:
        s.log(f"saved checkpoint {path}")
    if s.run:
        s.run.trackers.results(dict(st.metrics, status=status), st.step, "summary.json")
        s.run.set_status(status, step=st.step, metrics=st.metrics)
        s.run.close()
    return dict(st.metrics, step=st.step, status=status, run_dir=str(s.run.path) if s.run else "")


def progress_bar(s: Session) -> Progress:
    """A bar on a terminal; under SLURM or a pipe the log lines are the progress, and a line with the step and
    ETA when they have been silent for a while (a long --log_freq)."""
    return Progress(s.cfg.iters, "pretrain", s.dist.is_main and s.cfg.verbose, initial=s.state.step)


def pretrain(cfg: PretrainConfig, should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Set up and run ``cfg``; returns the final metrics, step, status and run folder. ``should_stop`` is asked
    after every step (the entry point answers it from SIGTERM/SIGINT); the run then saves and stops."""
    s = None
    try:
        s = setup(cfg)
        return loop(s, should_stop)
    except BaseException as e:
        failure = distributed.peer_failure(e, s.dist.rank if s else 0)
        if s is not None and s.run is not None:  # SystemExit: a second signal exits without saving
            status = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"
            try:
                s.run.set_status(status, step=s.state.step, error=f"{type(e).__name__}: {e}")
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
        raise
    finally:
        distributed.cleanup()


def random_init_knn(cfg: PretrainConfig) -> float:
    """kNN top-1 of the same network at random initialisation (the baseline a run must beat)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed if cfg.seed >= 0 else 0)
    train = maybe_subset(get_dataset(cfg.data, "train", cfg.data_path, cfg.image_size), cfg.train_subset, 0)
    test = maybe_subset(get_dataset(cfg.data, "test", cfg.data_path, cfg.image_size), cfg.test_subset, 0)
    model = build_model(cfg, train.image_size).to(device)
    return knn_monitor(model.convnet, train, test, train.image_size, device, autocast_dtype(cfg.precision, device),
                       cfg.knn_k, cfg.knn_t)["knn_top1"]
