"""``simclr eval`` and ``simclr knn``, the job: read the encoder, the labelled data and any saved head
(:func:`load_inputs`, before any folder is created), extract features (:class:`Features`, cached on disk),
run one protocol of :mod:`.protocols` (linear, fast-linear, kNN; semi-supervised, fine-tuning, transfer and
eval-only are options of them), and write ``eval.json`` — the same structure whatever the protocol — into a run
folder. The SGD linear head's steps are checkpointed, stopped and resumed by :mod:`.resume`.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from .. import config as config_lib
from .. import runtime
from ..checkpoint import load_weights, resolve, unpin
from ..data import balanced_indices, check_same_classes, data_folder, get_dataset
from ..errors import CheckpointError, ConfigError, DataError, UserError
from ..files import sha256_file
from ..lifecycle import Lifecycle
from ..progress import hms
from ..runtime import describe_compute
from ..eval_options import EvalConfig
from ..rundir import RunDir, check_kind, check_run_folder, environment, release_held
from ..trackers import require
from ..weights import Encoder, load_encoder
from .fast_linear import parse_grid
from .features import Features, augment_transform, native_side
from .linear import head_from_state, load_head, save_head, train_on_images
from .protocols import fast_linear_eval, head_eval, knn_eval, linear_eval, protocol_variant
from .resume import (HeadCheckpoints, Stopped, check_fits, head_info, record_refusal, result_metrics,
                     resume_point)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# what an evaluation reads: encoder, saved head, data (bad input fails here, before any folder exists)
# --------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    device: torch.device
    amp: Optional[torch.dtype]
    encoder: Encoder
    encoder_hash: str             # sha256 of the encoder file ("" for random init or a fine-tuned result)
    layer: str                    # the encoder layer evaluated (encode_layer)
    image_size: int
    aug: str                      # the training augmentation of the linear protocols ("none": plain images)
    head_state: Optional[dict]    # a saved head (--eval_only)
    train: object
    test: object
    unlabeled: Optional[object]   # the labelled rest of the training split (--acc_on_unlabeled)
    classes: list
    channels_last: bool = False   # the encoder's layout (runtime.channels_last_on: auto, as pretraining)

    @property
    def compute(self) -> dict:
        from ..runtime import precision_name
        return {"precision": precision_name(self.amp), "channels_last": self.channels_last}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(x, self.layer)

    def feat_dim(self) -> int:
        with torch.no_grad():
            return int(self.encode(torch.zeros(2, 3, self.image_size, self.image_size, device=self.device)).shape[1])


def run_kind(cfg: EvalConfig) -> str:
    """What the run folder records as its kind: ``knn`` for simclr knn, ``eval`` for the linear protocols."""
    return "knn" if cfg.protocol == "knn" and not cfg.compare else "eval"


def load_inputs(cfg: EvalConfig) -> Inputs:
    from ..runtime import autocast_dtype, channels_last_on, resolve_device, tune_cpu
    require(cfg.logger, cfg.mlflow_uri)  # a tracker that is not installed stops the job before any work
    if cfg.run_dir and Path(cfg.run_dir).is_dir():  # a folder of another kind is refused before any work
        check_run_folder(Path(cfg.run_dir))
        check_kind(Path(cfg.run_dir), run_kind(cfg))
    device = resolve_device(cfg.device)
    tune_cpu(device)  # as pretraining does: feature extraction and a fine-tuning step are its steps
    if cfg.seed < 0:  # a random-init baseline is reproducible by default (seed 0); a trained encoder draws one
        cfg.seed = 0 if not cfg.encoder_ckpt else random.SystemRandom().randrange(2 ** 31)
    torch.manual_seed(cfg.seed)
    layer, head_state = cfg.encode_layer, None
    if cfg.eval_only:
        if not cfg.ckpt:
            raise ConfigError("--eval_only true needs --ckpt PATH (a saved linear head)")
        if cfg.protocol == "knn" or cfg.compare:
            raise ConfigError("--eval_only evaluates a saved linear head: use it with --protocol linear "
                              "and without --compare")
        head_state = load_head(cfg.ckpt, cfg.trust_checkpoint)
        saved = head_state["info"].get("config") or {}
        if saved.get("encode_layer") and saved["encode_layer"] != layer:
            log.info(f"note: the head was trained on encode_layer {saved['encode_layer']}; using it")
            layer = saved["encode_layer"]
    encoder, encoder_hash = _load_encoder(cfg, device, layer)
    if head_state is not None and head_state["encoder"] is not None:
        origin = saved.get("encoder_ckpt") or "its encoder"  # a fine-tuned result
        load_weights(encoder.model, head_state["encoder"], f"{cfg.ckpt} (its fine-tuned encoder)",
                     f"pass the encoder it was fine-tuned from as --encoder_ckpt ({origin})")
        encoder_hash = ""  # its features are not those of the encoder file: no cache
    train_encoder = cfg.finetune and not cfg.eval_only
    for p in encoder.parameters():  # parameters fixed by design (bn2's bias) stay fixed
        p.requires_grad_(p.requires_grad and train_encoder)
    encoder.eval()
    channels_last = channels_last_on("auto", device)  # the rule pretraining follows (runtime.fast_compute)
    if channels_last:
        encoder.to(memory_format=torch.channels_last)
    image_size = cfg.image_size or encoder.input_size
    encoder.warn_size = False  # the size is the command's choice, printed at start
    train, test, unlabeled, classes = _load_splits(cfg, image_size)
    for split, ds in (("train", train), ("test", test)):
        while hasattr(ds, "base"):  # a subset's files are its split's
            ds = ds.base
        bad = getattr(ds, "bad_images", None)
        if bad:  # --skip_bad_images true
            log.warning(f"warning: skipped {len(bad)} unreadable image file(s) of the {split} split, e.g. {bad[0]}")
    inp = Inputs(device, autocast_dtype(cfg.precision, device), encoder, encoder_hash, layer, image_size,
                 cfg.augmentation if cfg.aug else "none", head_state, train, test, unlabeled, classes, channels_last)
    if head_state is not None:  # a head that does not fit fails before any folder is created
        _check_head(cfg, inp, head_state["weight"])
        match_head_classes(head_state, classes, cfg.ckpt)
    return inp


def _load_encoder(cfg: EvalConfig, device: torch.device, layer: str) -> tuple[Encoder, str]:
    if cfg.encoder_ckpt:  # a run folder means its newest valid checkpoint; recorded as the file it took
        cfg.encoder_ckpt = str(resolve(cfg.encoder_ckpt))  # a run folder's is pinned against pruning ...
        try:
            enc = load_encoder(cfg.encoder_ckpt, trust=cfg.trust_checkpoint, device=device, frozen=False)
            digest = sha256_file(Path(cfg.encoder_ckpt))
        finally:
            unpin(Path(cfg.encoder_ckpt))  # ... until it is read
    else:
        from ..data import native_size
        from ..models import build_model, is_named
        size = native_size(cfg.data, cfg.image_size)
        width = "" if is_named(cfg.encoder_arch) else f"width {cfg.encoder_width}, "
        log.info(f"note: no --encoder_ckpt given: evaluating a randomly initialised {cfg.encoder_arch} "
                 f"({width}seed {cfg.seed}) — a baseline, not a trained encoder")
        model = build_model(SimpleNamespace(arch=cfg.encoder_arch, width=cfg.encoder_width, proj_layers=2,
                                            proj_dim=128, timm_kwargs=cfg.timm_kwargs), size)
        enc, digest = Encoder(model, size, "random-init").to(device), ""
    if layer != "h":
        with torch.no_grad():  # fail now, not after minutes of feature extraction
            try:
                enc.encode(torch.zeros(2, 3, enc.input_size, enc.input_size, device=device), layer)
            except ValueError as e:
                raise ConfigError(f"option 'encode_layer': {e}") from None
    return enc, digest


def _load_splits(cfg: EvalConfig, image_size: int) -> tuple:
    """(train, test, unlabelled rest or None, class names) of ``cfg.data``. Eval-only reads no training split
    (train is None): a saved head is scored on the test split alone."""
    test = get_dataset(cfg.data, "test", cfg.data_path, image_size, cfg.skip_bad_images)
    if cfg.eval_only:
        if cfg.test_subset and cfg.test_subset < len(test):
            test = test.subset(balanced_indices(test.targets, cfg.test_subset, 0))
        return None, test, None, list(test.classes)
    full = get_dataset(cfg.data, "train", cfg.data_path, image_size, cfg.skip_bad_images)
    labelled = [i for i, t in enumerate(full.targets) if t >= 0]
    if len(labelled) < len(full):
        full = full.subset(labelled)
    check_same_classes(full, test)
    if cfg.train_subset and cfg.train_subset < len(full):  # the pool (e.g. a small CPU run)
        full = full.subset(balanced_indices(full.targets, cfg.train_subset, 0))
    unlabeled = None
    if 0 < cfg.train_size < len(full):
        idx = balanced_indices(full.targets, cfg.train_size, cfg.data_split_seed)
        train = full.subset(idx)
        if cfg.acc_on_unlabeled:
            unlabeled = full.subset(sorted(set(range(len(full))) - set(idx)))
    else:
        if cfg.acc_on_unlabeled:
            raise ConfigError("--acc_on_unlabeled true needs --train_size N smaller than the training split")
        train = full
    if cfg.test_subset and cfg.test_subset < len(test):
        test = test.subset(balanced_indices(test.targets, cfg.test_subset, 0))
    if len(full.classes) < 2:
        raise DataError(f"{cfg.data} has {len(full.classes)} class; evaluation needs at least 2")
    return train, test, unlabeled, list(full.classes)


def _check_head(cfg: EvalConfig, inp: Inputs, weight: torch.Tensor) -> None:
    d = inp.feat_dim()
    if weight.shape[1] != d:
        raise CheckpointError(f"{cfg.ckpt}: the head expects {weight.shape[1]}-dim features but the "
                              f"encoder gives {d} at layer {inp.layer} (another encoder or encode_layer?)")
    if weight.shape[0] != len(inp.classes):
        raise CheckpointError(f"{cfg.ckpt}: the head has {weight.shape[0]} classes but "
                              f"{cfg.data} has {len(inp.classes)}")


def match_head_classes(head_state: dict, classes: list, ckpt: str) -> None:
    """A head scores classes by name, not by position: its rows are put in the order of this data's classes.
    A head that records no class names (the spec's) is taken by position, with a note; names that differ (a
    class folder renamed, another dataset) are refused, naming them."""
    saved = (head_state.get("info") or {}).get("classes")
    if not isinstance(saved, list) or len(saved) != len(classes) or not all(isinstance(c, str) for c in saved):
        log.info(f"note: {ckpt} records no class names: its rows are taken in the order of the data's classes "
                 f"({', '.join(map(str, classes[:4]))}{' ...' if len(classes) > 4 else ''})")
        return
    if saved == list(classes):
        return
    missing, extra = sorted(set(saved) - set(classes)), sorted(set(classes) - set(saved))
    if missing or extra:
        raise CheckpointError(f"{ckpt}: the head was trained on other classes than the test split has: only in the "
                              f"head {missing[:5]}, only in the data {extra[:5]}; evaluate it on the data it was "
                              f"trained for (or rename the class folders back)")
    order = [saved.index(c) for c in classes]
    head_state["weight"], head_state["bias"] = head_state["weight"][order], head_state["bias"][order]


# --------------------------------------------------------------------------------------------
# each protocol: features from the job, the tensors to :mod:`.protocols`, the head into the run folder
# --------------------------------------------------------------------------------------------
def linear(cfg: EvalConfig, inp: Inputs, feats: Features, run: RunDir,
           ckpts: Optional[HeadCheckpoints] = None) -> dict:
    """The SGD linear head; ``ckpts`` restores, saves and stops its steps (default: no resume, no stop)."""
    if inp.head_state is not None:  # --eval_only: a saved head on this encoder's test features
        head = head_from_state(inp.head_state, inp.device)
        res, details = head_eval(head, feats.test(), inp.classes, feats.unlabeled())
        saved = inp.head_state["info"].get("metrics") or {}
        details.update(eval_only=True, head_source=cfg.ckpt, saved_top1=saved.get("top1"))
        return dict(res, details=details, head_ckpt=None)
    ckpts = ckpts or HeadCheckpoints(cfg, inp, run)
    if not cfg.finetune and (inp.aug == "none" or cfg.n_augs_train > 0):
        f, y = feats.train()
        log.info(f"training the linear head on {'x'.join(map(str, f.shape[:-1]))} precomputed features "
                 f"(dim {f.shape[-1]}) for {cfg.iters} steps")
        head, res, details = linear_eval((f, y), feats.test(), inp.classes, cfg, cfg.seed, cfg.verbose,
                                         ckpts.after_step, feats.unlabeled(), start=ckpts.start)
    else:  # images augmented on the fly: the frozen encoder's features every step, or fine-tuning it
        if cfg.finetune:
            log.info(f"fine-tuning the encoder (lr {cfg.encoder_lr if cfg.encoder_lr >= 0 else cfg.lr}) and a "
                     f"linear head (lr {cfg.lr}) on {len(inp.train)} images for {cfg.iters} steps")
        else:
            log.info(f"training the linear head on {inp.aug}-augmented images (frozen encoder, features "
                     f"computed every step) for {cfg.iters} steps")
        transform = augment_transform(inp.aug, inp.image_size, native_side(inp.train), cfg.scale_lower)
        on_step = _cpu_cost_note(cfg, inp, "fine-tuning" if cfg.finetune else "on-the-fly augmentation",
                                 ckpts.after_step)
        head = train_on_images(inp.encoder, inp.encode, inp.train, transform, len(inp.classes), inp.feat_dim(),
                               cfg, inp.device, inp.amp, finetune=cfg.finetune, seed=cfg.seed,
                               progress=cfg.verbose, on_step=on_step, start=ckpts.start)
        if cfg.finetune:
            feats.encoder_changed()
        res, details = head_eval(head, feats.test(), inp.classes, feats.unlabeled())
        details["fit"] = "sgd"
        if cfg.finetune:
            details["finetune"] = True
    return dict(res, details=details, head_ckpt=str(ckpts.final(res)))


def _cpu_cost_note(cfg: EvalConfig, inp: Inputs, what: str, on_step: Callable) -> Callable:
    """Training on images (the spec's default protocol) encodes a whole batch every step: minutes to an hour on a
    CPU. Said at the start, with the fast ways to the same kind of number; returns ``on_step`` that also says
    what the first step (of this invocation) took and what all of them will."""
    if inp.device.type != "cpu":
        return on_step
    bs = min(cfg.batch_size, len(inp.train))
    log.info(f"note: on the CPU, {what} encodes {bs} images every step, {cfg.iters} steps ({bs * cfg.iters} encoder "
             f"passes): hours for the spec's settings (an estimate follows the first step). Faster: --augmentation "
             f"none (features computed once) or --protocol fast-linear")
    t0, first = time.time(), []

    def step(fit) -> None:
        if not first:
            first.append(fit.step)
            took = time.time() - t0
            left = cfg.iters - fit.step + 1
            log.info(f"first step took {took:.1f} s: about {hms(took * left)} for {left} steps")
        on_step(fit)
    return step


def fast_linear(cfg: EvalConfig, inp: Inputs, feats: Features, run: RunDir, ckpts=None) -> dict:
    if cfg.finetune:
        raise ConfigError("--finetune true trains the encoder, which the fast linear probe does not; use "
                          "--protocol linear")
    f, y = feats.train()
    log.info(f"fast linear probe: L-BFGS logistic regression on {'x'.join(map(str, f.shape[:-1]))} "
             f"features (dim {f.shape[-1]})")
    head, res, details = fast_linear_eval((f, y), feats.test(), inp.classes, parse_grid(cfg.l2_grid), cfg.holdout,
                                          cfg.fast_iters, cfg.data_split_seed, feats.unlabeled())
    path = run.path / "checkpoints" / "fast-linear-head.pt"
    save_head(path, head, head_info(cfg, inp, cfg.iters, "fast-linear", result_metrics(res)))
    return dict(res, details=details, head_ckpt=str(path))


def knn(cfg: EvalConfig, inp: Inputs, feats: Features, run: RunDir, ckpts=None) -> dict:
    if cfg.finetune:
        raise ConfigError("--finetune true is for --protocol linear; kNN uses the frozen encoder")
    unlabeled = None if inp.unlabeled is None else feats.plain(inp.unlabeled, "unlabelled rest of train")
    res, details = knn_eval(feats.plain(inp.train, "train"), feats.plain(inp.test, "test"), inp.classes, cfg.k,
                            cfg.temperature, cfg.knn_vote, unlabeled)
    return dict(res, details=details, head_ckpt=None)


PROTOCOLS = {"linear": linear, "fast-linear": fast_linear, "knn": knn}


# --------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------
def _timed(protocol: Callable, *args) -> dict:
    t = time.time()
    res = protocol(*args)
    res["seconds"] = time.time() - t
    return res


def run_eval(cfg: EvalConfig, should_stop: Callable[[], bool] = lambda: False,
             started: Callable[[], None] = lambda: None) -> dict:
    """Run ``cfg.protocol`` (and, with ``compare``, both linear protocols); write eval.json. ``should_stop`` is
    asked after every step of the SGD linear head (the entry point answers it from SIGTERM/SIGINT): its state is then
    saved and the run stops ``interrupted`` (returned: ``status``, ``step``, ``run_dir``); ``started`` is called as
    those steps begin (until then a signal stops the job at once: nothing to save yet). The run's status, messages
    and close: :class:`Lifecycle`."""
    t0, inp = time.time(), None
    with Lifecycle(cfg.verbose, out_of_memory=lambda: out_of_memory_error(cfg, inp)) as life:
        try:
            point = resume_point(cfg)  # the run folder continued is locked before its checkpoint is read
            try:
                inp = load_inputs(cfg)
                data_ids = {split: getattr(getattr(ds, "base", ds), "fingerprint", "") or None  # the files' identity
                            for split, ds in (("train", inp.train), ("test", inp.test))}
                check_fits(point, cfg, inp, data_ids["train"])
            except UserError as e:
                record_refusal(point.run, e)
                raise
            run = RunDir.create(cfg.root, cfg.name, str(point.run or cfg.run_dir), kind=run_kind(cfg),
                                data=data_folder(cfg.data, cfg.data_path))
        finally:
            release_held()
        life.begin(run, cfg, dict(environment(str(inp.device)), data_fingerprint=data_ids, compute=inp.compute),
                   protocol=cfg.protocol, iters=cfg.iters)  # from here on, whatever stops the job closes the folder
        feats = Features(cfg, inp)
        ckpts = HeadCheckpoints(cfg, inp, run, point, should_stop, started, data_ids["train"])
        train_part = "" if cfg.eval_only else f"{len(inp.train)} labelled training images, "
        log.info(f"evaluating {inp.encoder.name} from {cfg.encoder_ckpt or 'random init'} "
                 f"(sha256 {inp.encoder_hash[:12] or '-'}) on {cfg.data}: {train_part}{len(inp.test)} test images, "
                 f"{inp.image_size}px, {inp.device}, {describe_compute(inp.amp, inp.channels_last, inp.device)}; "
                 f"run folder {run.path}")
        try:
            result = _evaluate(cfg, inp, feats, run, ckpts, data_ids, t0)
        except Stopped as stop:
            log.info(f"stopped at step {stop.step} of {cfg.iters}; saved {stop.path}")
            life.end("interrupted", step=stop.step, iters=cfg.iters, protocol=cfg.protocol)
            return {"status": "interrupted", "step": stop.step, "iters": cfg.iters, "run_dir": str(run.path)}
        # paths inside the run folder are recorded relative to it: a copied folder describes itself
        run.write_json("eval.json", dict(result, run_dir=".", head_ckpt=_relative(result["head_ckpt"], run.path)))
        run.log_metrics({"step": cfg.iters, "top1": result["top1"], "top5": result["top5"]})
        life.end("finished", (result, cfg.iters, "eval.json"), top1=result["top1"], top5=result["top5"])
        return result


def _evaluate(cfg: EvalConfig, inp: Inputs, feats: Features, run: RunDir, ckpts: HeadCheckpoints, data_ids: dict,
              t0: float) -> dict:
    """The protocol (and with ``--compare`` the other linear one) -> what eval.json holds."""
    args = (cfg, inp, feats, run, ckpts)
    res = _timed(PROTOCOLS[cfg.protocol], *args)
    compare = None
    if cfg.compare:
        other = "fast-linear" if cfg.protocol == "linear" else "linear"
        both = {cfg.protocol: res, other: _timed(PROTOCOLS[other], *args)}
        if "linear" not in both:  # protocol knn: compare the two linear ones
            both["linear"] = linear(*args)
        compare = {k: {"top1": v["top1"], "top5": v["top5"], "seconds": v.get("seconds")}
                   for k, v in both.items()}
        compare["difference"] = both["fast-linear"]["top1"] - both["linear"]["top1"]
    return {
        "kind": "eval" if cfg.encoder_ckpt else "baseline",
        "protocol": "eval-only" if cfg.eval_only else cfg.protocol + ("+finetune" if cfg.finetune else ""),
        "top1": res["top1"], "top5": res["top5"], "per_class": res["per_class"], "confusion": res.get("confusion"),
        "n_train": 0 if cfg.eval_only else len(inp.train), "n_test": res["n"], "classes": inp.classes,
        "encoder": {"path": cfg.encoder_ckpt, "sha256": inp.encoder_hash, "arch": inp.encoder.name,
                    "feat_dim": inp.encoder.feat_dim, "layer": inp.layer, "input_size": inp.encoder.input_size,
                    "random_init": not cfg.encoder_ckpt},
        "data": {"name": cfg.data, "path": cfg.data_path, "image_size": inp.image_size,
                 "train_size": cfg.train_size, "data_split_seed": cfg.data_split_seed,
                 "augmentation": inp.aug, "n_augs_train": cfg.n_augs_train, "n_augs_test": cfg.n_augs_test,
                 "fingerprint": data_ids},
        "details": dict(res["details"], protocol_variant=protocol_variant(cfg, inp.aug), problem=cfg.problem),
        "head_ckpt": res["head_ckpt"], "compare": compare,
        "feature_cache_hits": feats.cache.hits, "seconds": time.time() - t0, "device": str(inp.device),
        "compute": inp.compute,
        "config": config_lib.to_dict(cfg), "run_dir": str(run.path),
    }


def out_of_memory_error(cfg: EvalConfig, inp: Optional[Inputs]) -> UserError:
    """What was asked of the device, and the batch sizes that set it."""
    train = f"--batch_size {cfg.batch_size} (training the head{', and the encoder' if cfg.finetune else ''})"
    key = "precompute_emb_bs" if cfg.precompute_emb_bs > 0 else "test_bs"
    extract = f"--{key} {getattr(cfg, key)} (feature extraction)"
    lower = extract if run_kind(cfg) == "knn" else f"{extract} or {train}"
    device = inp.device if inp is not None else cfg.device
    what = f"evaluating {inp.encoder.name} at {inp.image_size}px" if inp is not None else f"evaluating on {cfg.data}"
    return runtime.out_of_memory_error(device, what, f"lower {lower}")


def _relative(path, run: Path):
    """``path`` relative to the run folder ``run`` when it lies inside it."""
    if not path:
        return path
    try:
        return str(Path(path).relative_to(run))
    except ValueError:
        return str(path)
