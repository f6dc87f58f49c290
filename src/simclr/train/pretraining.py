"""SimCLR pretraining, the entry: :func:`pretrain` runs :func:`setup` (processes, seeds, the resume point, data,
parts, run folder; bad input fails there, before any folder is created), then :func:`simclr.train.loop.loop`, and
turns what stops it into the run's status and one clear error.

The seams, each in its module: the step and what it runs on (:mod:`.step`: :func:`~.step.build` resolves the config
into the :class:`~.step.Parts`, :func:`~.step.train_step` takes the parts, a batch and the step), the loop
(:mod:`.loop`), where a run continues from and what it saves (:mod:`.resume`), and the run's state (:mod:`.session`).

Counted in optimizer steps: everything that depends on time (learning rate, which images a step draws, their
augmentations, the kNN schedule) is a function of the global step, so a resumed run continues the same
trajectory. Signals belong to the caller: :func:`pretrain` only asks ``should_stop()`` after each step, then
saves and stops.
"""
from __future__ import annotations

import json
import random
import time
from typing import Callable, Optional

import torch

from .. import config as config_lib
from .. import distributed, runtime
from .. import trackers
from ..data import check_same_classes, data_folder, get_dataset, maybe_subset, native_size
from ..data.scan import one_scan
from ..errors import UserError
from ..lifecycle import Lifecycle
from ..evaluate.monitor import knn_monitor
from ..files import append_line
from ..models import build_model
from ..names import is_named, resolve_width
from ..options import PretrainConfig
from ..rundir import RunDir, environment, release_held
from ..runtime import autocast_dtype, channels_last_on, resolve_device, seed_everything, tune_backends
from .data_identity import check_data_identity, refusal_recorded
from .loop import loop
from .resume import read_resume, restore, resume_point
from .session import Session
from .step import build, wrap


def pretrain(cfg: PretrainConfig, should_stop: Callable[[], bool] = lambda: False,
             started: Callable[[], None] = lambda: None) -> dict:
    """Set up and run ``cfg``; returns the final metrics, step, status and run folder. ``should_stop`` is asked
    after every step (the entry point answers it from SIGTERM/SIGINT); the run then saves and stops.
    ``started`` is called once the set-up is done, as the loop begins (the entry point: from here on a signal
    waits for the step; before, it stops at once). The run's status, messages and close: :class:`Lifecycle`."""
    s = None
    life = Lifecycle(cfg.verbose, out_of_memory=lambda: out_of_memory_error(cfg, s),
                     at_failure=lambda: {"step": s.step} if s is not None else {})
    try:
        with life:
            s = setup(cfg, life)
            started()
            out = loop(s, should_stop)
            life.end(out["status"], (dict(s.metrics, status=out["status"]), s.step, "summary.json"), step=s.step,
                     metrics=s.metrics)
            return out
    except BaseException as e:
        failure = distributed.peer_failure(e, s.dist.rank if s else 0)
        if failure is not None:  # a peer died or hung: one clear line instead of a gloo/NCCL traceback
            e = failure
        if life.run is not None and isinstance(e, UserError):
            e.run_dir = str(life.run.path)  # the entry point says how to continue
        if failure is not None:
            raise failure from None
        raise
    finally:
        release_held()  # a set-up that failed before its RunDir took the run folder's lock over
        distributed.cleanup()


def out_of_memory_error(cfg: PretrainConfig, s: Optional[Session]) -> UserError:
    """What was asked of the device, and the three ways to ask less (the activations grow with the batch, and with
    the model's width and depth)."""
    device = s.parts.device if s is not None and s.parts is not None else cfg.device
    if is_named(cfg.arch):
        model = cfg.arch
    else:
        arch, width = resolve_width(cfg.arch, cfg.width, cfg.width_multiplier)
        model = f"{arch} width {width}"
    chunks = (f"raise --grad_cache_chunks (now {cfg.grad_cache_chunks})" if cfg.grad_cache_chunks > 1 else
              "pass --grad_cache_chunks K (the same gradient in K chunks of the batch, about 1/K of the activations)")
    size = native_size(cfg.data, cfg.image_size)
    return runtime.out_of_memory_error(
        device, f"--batch_size {cfg.batch_size} x {cfg.multiplier} views of {size}px through {model}",
        f"{chunks}, lower --batch_size, or train a smaller model (--arch, --width)")


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


def setup(cfg: PretrainConfig, life: Optional[Lifecycle] = None) -> Session:
    """Processes, seeds, the checkpoint to resume, data, parts, and (main process) the run folder, begun in
    ``life`` (:func:`pretrain`'s; none given: a session to experiment with, closed by ``s.run.close()``). Bad input
    fails here, before any folder is created."""
    life = life or Lifecycle(cfg.verbose)
    trackers.require(cfg.logger, cfg.mlflow_uri)  # every process: a missing package stops them all alike
    dist = distributed.init("cuda" if cfg.device.startswith("cuda") or
                            (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    device = resolve_device(cfg.device, dist.local_rank)
    life.set_main(dist.is_main)
    seed_drawn = cfg.seed < 0
    if seed_drawn:
        cfg.seed = int(distributed.broadcast_object(random.SystemRandom().randrange(2 ** 31)))
    resume_from, run_dir = resume_point(cfg, lock=dist.is_main)  # locked before its checkpoint is read
    # a refused resume says "failed" (a requeue loop stops); the split's folder is read once for both of its uses
    with refusal_recorded(run_dir, dist.is_main), one_scan():
        ck = read_resume(resume_from, cfg, seed_drawn) if resume_from is not None else None
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        seed_everything(cfg.seed + dist.rank)
        images = get_dataset(cfg.data, "pretrain", cfg.data_path, cfg.image_size, cfg.skip_bad_images)
        # grows while reading when workers == 0
        bad_images = getattr(images, "bad_images", None) or []
        fingerprint, listing = images.fingerprint, images.listing  # of the whole split (a subset is drawn from it)
        if ck is not None:
            check_data_identity(ck, images, resume_from, cfg.allow_config_change)
        images = maybe_subset(images, cfg.train_subset, seed=0)
        # every rank the same options and images before anything is built (a --width typo died in DDP, an --lr one
        # trained "successfully" with rank 0's value recorded); those of role per_process excepted (where each
        # process is, what it prints or writes: only rank 0 writes)
        per_process = config_lib.with_role(type(cfg), "per_process")
        shared = {k: v for k, v in config_lib.to_dict(cfg).items() if k not in per_process}
        # the content identity, not --data_path: each node may read its own copy of the images at its own path
        distributed.check_same_config(dict(shared, data_content=fingerprint))
        monitor_sets = knn_sets(cfg)
        s = Session(cfg, dist, build(cfg, images, device, dist.rank, dist.world), images, bad_images)
        s.knn_sets = monitor_sets
        s.data_fingerprint, s.data_listing = fingerprint, listing
        if ck is not None:
            restore(s, ck, resume_from)
        distributed.check_same(s.step, "the step to resume from")
    tune_backends(device, cfg.deterministic)
    wrap(s.parts, dist.enabled)
    if dist.is_main:
        run = RunDir.create(cfg.root, cfg.name, run_dir, data=data_folder(cfg.data, cfg.data_path))
        life.begin(run, cfg, dict(environment(str(device)), data_fingerprint=fingerprint, compute=s.parts.compute),
                   step=s.step, iters=cfg.iters)  # from here on, whatever stops the run closes the folder
        if ck is not None and ck["config_changes"]:  # --allow_config_change: what changed, and when
            append_line(run.path / "config_history.jsonl", json.dumps(
                {"time": time.time(), "step": s.step, "changes": ck["config_changes"]}, default=str) + "\n")
        s.run = run
    return s


def knn_sets(cfg: PretrainConfig) -> tuple:
    """The kNN monitor's labelled (train, test) images: the same training images as pretraining when a subset
    is asked for. Read in the set-up, so that a missing or empty split, or one lacking a class, is refused before
    the run folder exists rather than at the first evaluation."""
    sets = tuple(maybe_subset(get_dataset(cfg.data, split, cfg.data_path, cfg.image_size, cfg.skip_bad_images), n,
                              seed=0) for split, n in (("train", cfg.train_subset), ("test", cfg.test_subset)))
    check_same_classes(*sets)  # labels meet here: one class list for both
    return sets
