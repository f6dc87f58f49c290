"""The SimCLR pretraining loop, counted in optimizer steps.

Everything that depends on time — learning rate, which images a step draws, their
augmentations, the kNN schedule — is a function of the global step, so a resumed run
continues the same trajectory.
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import checkpoint as ckpt_lib
from . import config as config_lib
from . import distributed
from .options import PretrainConfig
from .data import get_dataset, maybe_subset
from .data.loaders import build_loader
from .errors import UserError
from .evaluate import extract_features, knn_classifier
from .evaluate.sharded import sharded_knn
from .loss import nt_xent
from .models import SimCLRModel, build_model, convert_sync_batchnorm
from .optim import build_optimizer, lr_schedule, set_lr
from .rundir import RunDir, environment, find_run_dir
from .runtime import autocast_dtype, resolve_device, rng_state, seed_everything, set_rng_state


# --------------------------------------------------------------------------------------------
# one SimCLR forward pass (shared by the trainer, `simclr bench` and benchmarks/)
# --------------------------------------------------------------------------------------------
def contrastive_loss(forward_model: nn.Module, x: torch.Tensor, temperature: float, multiplier: int,
                     amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False):
    """x: (m*N, 3, S, S) views ordered [view 1; view 2; ...] -> (NT-Xent loss, contrastive accuracy).
    The network runs under autocast when ``amp_dtype`` is set; the loss is always fp32."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        z = forward_model(x)["z"]
    return nt_xent(z, temperature, multiplier)


# --------------------------------------------------------------------------------------------
# kNN monitor
# --------------------------------------------------------------------------------------------
def knn_monitor(model: SimCLRModel, cfg: PretrainConfig, train_set, test_set, image_size: int,
                device: torch.device, amp_dtype) -> dict:
    """Weighted kNN (k, T from the config) of h on the labelled train split -> test split."""
    was_training = model.training
    model.eval()
    try:
        enc = model.convnet
        if distributed.is_enabled():  # every rank embeds 1/W of both sets; the result covers all of them
            return sharded_knn(enc, train_set, test_set, image_size, device, amp_dtype, cfg.knn_k, cfg.knn_t)
        tr_f, tr_y = extract_features(enc, train_set, image_size, 512, 0, device, amp_dtype)
        te_f, te_y = extract_features(enc, test_set, image_size, 512, 0, device, amp_dtype)
        res = knn_classifier(tr_f, tr_y, te_f, te_y, k=cfg.knn_k, temperature=cfg.knn_t)
    finally:
        model.train(was_training)
    return {"knn_top1": res["top1"], "knn_top5": res["top5"]}


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    """Builds everything from a config and runs the loop. ``run()`` returns the final metrics."""

    def __init__(self, cfg: PretrainConfig, notes=()):
        self.cfg = cfg
        self.dist = distributed.init("cuda" if cfg.device.startswith("cuda") or
                                     (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self._seed_drawn = cfg.seed < 0  # a resumed run then takes the checkpoint's seed (see _load)
        if cfg.seed < 0:
            cfg.seed = int(distributed.broadcast_object(random.SystemRandom().randrange(2 ** 31)))
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
        seed_everything(cfg.seed + self.dist.rank)
        self.notes = list(notes)

        # data: fail on bad input before any folder is created
        images = get_dataset(cfg.data, "pretrain", cfg.data_path, cfg.image_size, cfg.skip_bad_images)
        # unreadable files skipped with --skip_bad_images (grows while reading when workers == 0)
        self.bad_images: list = getattr(images, "bad_images", None) or []
        self.images = maybe_subset(images, cfg.train_subset, seed=0)
        self.image_size = self.images.image_size
        self.loader = build_loader(cfg, self.images, self.device, self.dist.rank, self.dist.world)

        # model
        model = build_model(cfg, self.image_size).to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.dist.enabled and cfg.sync_bn:
            model = convert_sync_batchnorm(model, self.device)  # CPU/gloo too
        self.model = model  # the unwrapped module: checkpoints and evaluation use it
        self.optimizer = build_optimizer(model, cfg.opt, cfg.lr, cfg.weight_decay, cfg.lars_exclude,
                                         foreach=self.device.type == "cuda")
        self.lrs = lr_schedule(cfg.lr, cfg.iters, cfg.lr_schedule, cfg.warmup)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0

        # resume
        run_dir = cfg.run_dir
        resume_from = None
        if cfg.ckpt:
            resume_from = Path(cfg.ckpt)
            run_dir = run_dir or str(find_run_dir(resume_from) or "")
        elif cfg.resume == "auto":
            if not cfg.run_dir:
                raise UserError("--resume auto needs --run_dir PATH (the run folder to continue)")
            resume_from = ckpt_lib.latest_valid(Path(cfg.run_dir), log=self.warn)
            if resume_from is None:
                self.print(f"note: no valid checkpoint in {cfg.run_dir}; starting from step 0")
        elif cfg.resume:
            raise UserError(f"--resume takes 'auto' (or use --ckpt PATH), got {cfg.resume!r}")
        if resume_from is not None:
            self._load(resume_from)
        distributed.check_same(self.step, "the step to resume from")

        forward_model = torch.compile(model) if cfg.compile else model
        if self.dist.enabled:
            forward_model = nn.parallel.DistributedDataParallel(
                forward_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward_model = forward_model

        # run folder (main process only)
        self.run: Optional[RunDir] = None
        if self.dist.is_main:
            self.run = RunDir.create(cfg.root, cfg.name, run_dir)
            for msg in self.__dict__.pop("_pending_log", []):
                self.run.log(msg)
            config_lib.save(cfg, self.run.path / "config.yaml")
            self.run.write_json("env.json", environment(str(self.device)))
            self.run.set_status("running", step=self.step, iters=cfg.iters)
        self._knn_sets = None

    # --- helpers --------------------------------------------------------------------------
    def print(self, msg: str) -> None:
        if self.dist.is_main:
            if self.cfg.verbose:
                from tqdm import tqdm
                tqdm.write(msg)
            if getattr(self, "run", None) is not None:
                self.run.log(msg)
            else:  # before the run folder exists (resume messages): written to log.txt once it does
                self.__dict__.setdefault("_pending_log", []).append(msg)

    def warn(self, msg: str) -> None:
        """Printed to stderr even with --verbose false (a skipped corrupt checkpoint must not go unseen)."""
        if self.dist.is_main and not self.cfg.verbose:
            print(msg, file=sys.stderr, flush=True)
        self.print(msg)

    def _load(self, path: Path) -> None:
        ck = ckpt_lib.load_checkpoint(path)
        if not isinstance(ck, dict) or ck.get("format") != ckpt_lib.FORMAT or "model" not in ck:
            raise UserError(f"{path} is not a pretraining checkpoint of this project "
                            f"({ckpt_lib.describe(ck)}); to evaluate the spec's checkpoints use simclr eval")
        saved = ck.get("config", {})
        for key in ("arch", "width", "proj_layers", "proj_dim"):
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise UserError(f"checkpoint {path} was trained with {key}={saved[key]!r} but this run has "
                                f"{key}={getattr(self.cfg, key)!r}; pass --{key} {saved[key]}")
        seed = saved.get("seed")
        if isinstance(seed, int) and seed >= 0 and seed != self.cfg.seed:
            # data order and augmentations are functions of (seed, step): continuing the same trajectory
            # needs the checkpoint's seed. A drawn seed (--seed -1, the default) is replaced silently.
            if not self._seed_drawn:
                self.warn(f"warning: {path} was trained with seed {seed}, this run has --seed {self.cfg.seed}: "
                          f"the images and augmentations from here on differ from an uninterrupted run")
            else:
                self.cfg.seed = seed
                self.loader = build_loader(self.cfg, self.images, self.device, self.dist.rank, self.dist.world)
        try:
            self.model.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise UserError(f"checkpoint {path} does not fit this model: {str(e).splitlines()[0]}") from None
        self.optimizer.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        if ck.get("rng"):
            set_rng_state(ck["rng"])
        self.step = int(ck["step"])
        self.nan_skips = int(ck.get("nan_skips", 0))
        self._saved_step = self.step  # it is on disk already: never rewrite it in place
        self.print(f"resumed from {path} at step {self.step}")

    def save(self) -> Optional[Path]:
        if self.run is None:
            return None
        path = ckpt_lib.checkpoint_path(self.run.path, self.step)
        if getattr(self, "_saved_step", None) == self.step and path.exists():
            return path  # saved at this step already (e.g. save_freq then stop): no second write
        payload = {"kind": "pretrain", "step": self.step, "image_size": self.image_size, "config": config_lib.to_dict(self.cfg),
                   "model": ckpt_lib.model_state(self.model), "optimizer": self.optimizer.state_dict(),
                   "scaler": self.scaler.state_dict(), "rng": rng_state(), "metrics": self.last_metrics,
                   "nan_skips": self.nan_skips}
        card = {"arch": self.cfg.arch, "width": self.cfg.width, "data": self.cfg.data,
                "image_size": self.image_size, "iters": self.cfg.iters,
                "epochs": self.step / max(self.loader.steps_per_epoch, 1), "metrics": self.last_metrics}
        ckpt_lib.save_checkpoint(path, payload, card)
        self._saved_step = self.step
        ckpt_lib.prune(self.run.path, self.cfg.keep_last)
        return path

    def evaluate(self) -> dict:
        if self._knn_sets is None:
            cfg = self.cfg
            train = get_dataset(cfg.data, "train", cfg.data_path, cfg.image_size, cfg.skip_bad_images)
            test = get_dataset(cfg.data, "test", cfg.data_path, cfg.image_size, cfg.skip_bad_images)
            # the monitor uses the same training images as pretraining when a subset is asked for
            self._knn_sets = (maybe_subset(train, cfg.train_subset, seed=0), maybe_subset(test, cfg.test_subset, seed=0))
        return knn_monitor(self.model, self.cfg, *self._knn_sets, self.image_size, self.device, self.amp_dtype)

    # --- the loop ---------------------------------------------------------------------------
    def _nonfinite(self, loss: torch.Tensor) -> torch.Tensor:
        """Divergence guard: a device bool, True when the loss or the gradient norm is not finite. With fp16
        loss scaling the scaler itself skips steps whose gradients overflow, so only the loss counts."""
        bad = ~torch.isfinite(loss.detach())
        if not self.scaler.is_enabled():
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                bad = bad | ~torch.stack(torch._foreach_norm(grads)).isfinite().all()
        return bad

    def _check_diverged(self) -> None:
        """With --on_nan stop the guard records the first bad step on the device (no host sync per step) and
        is read here — at log, eval and save points and at the end — so no checkpoint is ever written after
        a non-finite step, and the last good one stays untouched."""
        if self._first_bad is None:
            return
        first_bad = int(distributed.all_reduce_max(self._first_bad))
        if first_bad < 0:
            return
        self.step = first_bad  # steps completed with finite values: the run's state is that of checkpoint first_bad
        self.print(f"non-finite loss or gradient at step {first_bad}")
        if self.run:
            self.run.log_metrics({"step": first_bad, "event": "nan", "action": "stop"})
            self.run.set_status("failed", step=first_bad,
                                error=f"non-finite loss or gradient at step {first_bad}; last good checkpoint "
                                      f"kept; lower --lr or use --on_nan skip")
        raise UserError(f"non-finite loss or gradient at step {first_bad}: training stopped, the last good "
                        f"checkpoint is untouched. Lower --lr, or pass --on_nan skip.")

    def train_step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if cfg.grad_cache_chunks > 1:  # back-propagates here, chunk by chunk; returns a detached loss
            from .gradcache import grad_cache_backward
            self.optimizer.zero_grad(set_to_none=True)
            nan = self.step == getattr(cfg, "fail_at_step", -1)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return grad_cache_backward(self.forward_model, x, cfg.temperature, cfg.multiplier,
                                       cfg.grad_cache_chunks, self.amp_dtype, scale=self.scaler.scale,
                                       loss_hook=(lambda v: v * float("nan")) if nan else (lambda v: v))
        loss, acc = contrastive_loss(self.forward_model, x, cfg.temperature, cfg.multiplier, self.amp_dtype,
                                     cfg.channels_last)
        if self.step == getattr(cfg, "fail_at_step", -1):  # fault injection for tests of the divergence guard
            loss = loss * float("nan")
        return loss, acc

    def run_loop(self) -> dict:
        cfg = self.cfg
        self.last_metrics: dict = getattr(self, "last_metrics", {})
        self.nan_skips = getattr(self, "nan_skips", 0)
        start = self.step
        if start >= cfg.iters:
            self.print(f"nothing to do: already at step {start} of {cfg.iters}")
        self.print(f"pretraining {cfg.arch} (width {cfg.width}) on {cfg.data} ({len(self.images)} images, "
                   f"{self.image_size}px), batch {cfg.batch_size} x {cfg.multiplier} views, "
                   f"{cfg.iters} steps ({cfg.iters / max(self.loader.steps_per_epoch, 1):.1f} epochs), "
                   f"{self.device}, {self.dist.world} process(es)"
                   + (f"; run folder {self.run.path}" if self.run else ""))
        if self.bad_images:
            self.last_metrics["skipped_images"] = len(self.bad_images)
            self.print(f"warning: skipped {len(self.bad_images)} unreadable image file(s) (--skip_bad_images), "
                       f"e.g. {self.bad_images[0]}")
        pbar = None
        if self.dist.is_main and cfg.verbose:
            from tqdm import tqdm
            pbar = tqdm(total=cfg.iters, initial=start, desc="pretrain", dynamic_ncols=True, file=sys.stderr,
                        mininterval=1.0)
        if cfg.eval_at_start and start == 0:  # all ranks: the kNN monitor is split across them
            res = self.evaluate()
            self.last_metrics["knn_start_top1"] = res["knn_top1"]
            if self.run:
                self.run.log_metrics({"step": 0, "epoch": 0.0, **res})
            self.print(f"step 0 (random init): kNN top-1 {res['knn_top1']:.2f}%  top-5 {res['knn_top5']:.2f}%")
        distributed.barrier()
        self.model.train()
        t_last, n_last, data_time = time.perf_counter(), 0, 0.0
        t_data = time.perf_counter()
        status = "finished"
        stop_at = min(cfg.iters, start + cfg.stop_after) if cfg.stop_after else cfg.iters
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device) if cfg.on_nan == "stop" else None
        if True:
            for x, _ in self.loader.batches(start, cfg.iters):
                data_time += time.perf_counter() - t_data
                set_lr(self.optimizer, float(self.lrs[self.step]))
                # batch-norm running statistics change in the forward pass: keep a copy to undo a skipped step
                buffers = [b.detach().clone() for b in self.model.buffers()] if cfg.on_nan == "skip" else None
                loss, acc = self.train_step(x)
                if loss.requires_grad:  # (with --grad_cache_chunks, train_step has back-propagated already)
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.scale(loss).backward()
                bad = self._nonfinite(loss)
                if cfg.on_nan == "stop":  # recorded on the device, checked at the next log/eval/save point
                    self._first_bad = torch.where(bad & (self._first_bad < 0), self.step, self._first_bad)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                elif bool(bad):  # --on_nan skip decides now (one host sync per step)
                    self.print(f"non-finite loss or gradient at step {self.step}: step skipped")
                    if self.run:
                        self.run.log_metrics({"step": self.step, "event": "nan", "action": "skip"})
                    # skipped: no update, BN statistics restored; the step still counts (schedule, data
                    # order, logging, checkpoints and stop requests go on as for any other step)
                    self.nan_skips += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        for b, old in zip(self.model.buffers(), buffers):
                            b.copy_(old)
                else:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                self.step += 1
                n_last += x.shape[0] // cfg.multiplier * self.dist.world
                if pbar is not None:
                    pbar.update(1)

                if self.step % cfg.log_freq == 0 or self.step == cfg.iters:
                    self._check_diverged()
                    loss_v = distributed.all_reduce_mean(loss.detach()).item()
                    acc_v = distributed.all_reduce_mean(acc.detach()).item()
                    dt = time.perf_counter() - t_last
                    rec = {"step": self.step, "epoch": self.step / self.loader.steps_per_epoch, "loss": loss_v,
                           "contrast_acc": acc_v, "lr": float(self.lrs[self.step - 1]),
                           "images_per_s": n_last / max(dt, 1e-9), "data_time_frac": data_time / max(dt, 1e-9),
                           "nan_skips": self.nan_skips, "skipped_images": len(self.bad_images)}
                    self.last_metrics.update({k: rec[k] for k in ("loss", "contrast_acc")})
                    if self.run:
                        self.run.log_metrics(rec)
                        self.run.heartbeat(step=self.step)
                    if pbar is not None:
                        pbar.set_postfix(loss=f"{loss_v:.3f}", acc=f"{acc_v:.3f}")
                    self.print(f"step {self.step}/{cfg.iters} loss {loss_v:.4f} contrast_acc {acc_v:.3f} "
                               f"lr {rec['lr']:.4g} {rec['images_per_s']:.0f} img/s "
                               f"data {100 * rec['data_time_frac']:.0f}%")
                    t_last, n_last, data_time = time.perf_counter(), 0, 0.0

                if cfg.eval_freq and self.step % cfg.eval_freq == 0 and self.step != cfg.iters:
                    self._check_diverged()
                    self._eval_and_log()
                if cfg.save_freq and self.step % cfg.save_freq == 0 and self.step != cfg.iters:
                    self._check_diverged()
                    self.save()
                if self.step < cfg.iters and (self.should_stop() or self.step >= stop_at):
                    status = "interrupted"
                    break
                t_data = time.perf_counter()
        if pbar is not None:
            pbar.close()
        self._check_diverged()
        if status == "finished":
            self._eval_and_log()
        path = self.save()
        if path is not None:
            self.print(f"saved checkpoint {path}")
        if self.run:
            self.run.set_status(status, step=self.step, metrics=self.last_metrics)
            self.run.close()
        return dict(self.last_metrics, step=self.step, status=status,
                    run_dir=str(self.run.path) if self.run else "")

    def _eval_and_log(self) -> None:
        res = self.evaluate()  # on every rank (each embeds its share); only rank 0 logs
        if self.dist.is_main:
            self.last_metrics.update(res)
            self.last_metrics["best_knn_top1"] = max(self.last_metrics.get("best_knn_top1", 0.0), res["knn_top1"])
            if self.run:
                self.run.log_metrics({"step": self.step, "epoch": self.step / self.loader.steps_per_epoch, **res})
            self.print(f"step {self.step}: kNN top-1 {res['knn_top1']:.2f}%  top-5 {res['knn_top5']:.2f}%")
        distributed.barrier()


def pretrain(cfg: PretrainConfig, should_stop=lambda: False) -> dict:
    trainer = Trainer(cfg)
    trainer.should_stop = should_stop
    try:
        return trainer.run_loop()
    except BaseException as e:
        failure = distributed.peer_failure(e, trainer.dist.rank)
        if trainer.run is not None:  # SystemExit: a second SIGTERM/SIGINT (StopFlag) exits without saving
            status = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"
            try:
                trainer.run.set_status(status, step=trainer.step, error=f"{type(e).__name__}: {e}")
            except OSError:
                pass
        if failure is not None:  # a peer died or hung: one clear line instead of a gloo/NCCL traceback
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
    return knn_monitor(model, cfg, train, test, train.image_size, device, autocast_dtype(cfg.precision, device))["knn_top1"]
