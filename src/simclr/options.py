"""The options every job shares and the option schema of ``simclr pretrain`` (also the spec's ``python train.py``);
those of ``simclr eval`` and ``simclr knn`` are :mod:`simclr.eval_options`'s.

Every option is a field with a default, a help text and, where it matters, the allowed values or a range, and its
roles (:data:`simclr.config.ROLES`: does it change a run's trajectory, shape the weights, differ per process, make
another optimizer); :mod:`simclr.config` turns YAML and the command line into these. The spec's key names are the
option names, so its YAML files and command lines work unchanged.
"""
from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import auto_switch, nonneg, option, positive, seed_range
from .errors import ConfigError
from .names import (BACKBONES, BASE_WIDTH, DATA_ALIASES, DATASETS, RESNETS, blur_sigma_range, canonical_kwargs,
                    is_named, is_timm, resolve_width, split_arch)

# Keys the spec writes into its saved configs that describe a past run (its exman bookkeeping: run id,
# start time, final status, tmp flag, the file it was read from, the process count and GPU index of
# that run) rather than configure one. ``ckpt_iter`` joins them for pretraining only (eval gives it a
# meaning). Ignored with one note listing them.
IGNORED_KEYS = ("id", "time", "status", "tmp", "config_file", "number_of_processes", "gpu")
PRETRAIN_IGNORED_KEYS = IGNORED_KEYS + ("ckpt_iter",)

# Options the spec's configs carry that take one value here: accepted for compatibility, so its files and command
# lines work unchanged, and any other value is refused with the reason. The one place they are described: each
# field's help text and its check are made from this table by compatibility_only().
COMPATIBILITY_ONLY = {  # option: (commands, the one accepted value, why no other)
    "momentum": ("pretrain, eval", 0.9, "SGD/LARS momentum is fixed at 0.9, the spec's and the official SimCLR "
                 "value"),
    "model_id": ("pretrain, eval", -1, "-1 means not set: the spec's exman run ids are not used here; pass the "
                 "checkpoint file as --ckpt or --encoder_ckpt"),
    "arch": ("eval", "linear", "the classifier on the encoder is linear, as in the spec; the encoder's own "
             "architecture is --encoder_arch"),
}


def compatibility_only(name: str, **kw):
    """The field of a :data:`COMPATIBILITY_ONLY` option: its one value is the default and the only one accepted."""
    _, value, why = COMPATIBILITY_ONLY[name]
    return option(value, f"accepted for compatibility with the spec's configs, only as {value!r}: {why}",
                  check=lambda x: x == value, check_msg=f"this option is accepted for compatibility only, with the "
                  f"one value {value!r}: {why}", **kw)


PROBLEMS = ["sim-clr", "eval", "semi-supervised-eval"]
EVAL_PROBLEMS = ("eval", "semi-supervised-eval")

# Experiment trackers --logger can name (simclr.trackers); "none" = only the run folder's own files.
LOGGERS = ("tensorboard", "wandb", "mlflow")


def parse_loggers(value: str) -> list:
    """``"tensorboard,wandb"`` -> ``["tensorboard", "wandb"]`` (order kept, repeats dropped); ``none`` -> []."""
    names = [n.strip().lower() for n in str(value).split(",") if n.strip()]
    return [] if names == ["none"] else list(dict.fromkeys(names))


def _loggers_ok(value) -> bool:
    return isinstance(value, str) and all(n in LOGGERS for n in parse_loggers(value))


# Upper bounds of options whose size turns into memory (a typo such as --iters 1e12 must be a one-line error,
# not a 7 TiB allocation): generous for any real run.
MAX_ITERS, MAX_BATCH, MAX_SIDE, MAX_WIDTH, MAX_COUNT = 10_000_000, 1_000_000, 4096, 4096, 100_000


def within(lo: int, hi: int):
    return dict(check=lambda x: lo <= x <= hi, check_msg=f"must be within [{lo}, {hi:,}]")


def default_root() -> str:
    return os.environ.get("SIMCLR_LOGS") or os.environ.get("EXMAN_PATH") or "logs"


def _data(v):
    return DATA_ALIASES.get(v.lower(), v.lower()) if isinstance(v, str) else v


def _arch(v):
    """``ResNet50`` -> ``resnet50``; a timm model name after ``timm:`` is kept as written."""
    if not isinstance(v, str):
        return v
    v = v.strip()
    return "timm:" + v[5:] if v[:5].lower() == "timm:" else v.lower()


ARCH_HELP = (f"encoder: {', '.join(RESNETS)} (spec spelling ResNet50 accepted; resnet50x2 = --width_multiplier 2), "
             f"or timm:<model name> for any timm model (pip install 'simclr-torch[timm]'), e.g. timm:resnet18, "
             f"timm:vit_tiny_patch16_224")


def resolve_encoder(cfg, arch_key: str, width_key: str, mult_key: str = "") -> None:
    """Check the encoder options of ``cfg`` and write them in one canonical form: a ResNet as (name without the
    x suffix, width in channels, width_multiplier = width / 64 or 0 when not a multiple); a timm model as
    ``timm:<name>`` (known to timm) with canonical ``timm_kwargs``. Ways of writing the width that disagree, and
    options that do not apply to the encoder, are refused."""
    arch, width = getattr(cfg, arch_key), getattr(cfg, width_key)
    mult = getattr(cfg, mult_key) if mult_key else 0
    if is_named(arch):
        if is_timm(arch):
            from .models.timm_trunk import check_name  # a timm name is checked by timm itself (imports torch)
            check_name(arch)
        given = [f"--{k} {getattr(cfg, k)}" for k in (width_key, mult_key) if k and getattr(cfg, k)]
        if given:
            raise ConfigError(f"{' and '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to the built-in ResNets, "
                              f"not to {arch}: choose a wider model or set its own arguments with --timm_kwargs")
        if getattr(cfg, "zero_init_residual", False):
            raise ConfigError(f"--zero_init_residual applies to the built-in ResNets, not to {arch}; pass the "
                              f"model's own argument in --timm_kwargs (timm ResNets: '{{\"zero_init_last\": true}}')")
        return
    if cfg.timm_kwargs:
        raise ConfigError(f"--timm_kwargs applies to timm: archs and the in-repo backbones only, not to {arch}")
    base, _ = split_arch(arch)
    if base not in RESNETS:
        close = difflib.get_close_matches(base, [*RESNETS, *BACKBONES], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"option '{arch_key}' got {arch!r}; allowed: {', '.join([*RESNETS, *BACKBONES])} (a ResNet "
                          f"with an optional width multiplier: resnet50x2), or timm:<model name>{hint}")
    try:
        base, width = resolve_width(arch, width, mult)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    setattr(cfg, arch_key, base)
    setattr(cfg, width_key, width)
    if mult_key:
        setattr(cfg, mult_key, width // BASE_WIDTH if width % BASE_WIDTH == 0 else 0)


def _sigma_ok(v) -> bool:
    try:
        lo, hi = blur_sigma_range(v)
    except ValueError:
        return False
    return 0 < lo <= hi


LOSSES = ("nt-xent", "dcl")  # the built-in --loss names (simclr.loss builds them)


def _loss_known(name) -> bool:
    """A built-in loss, or one registered with ``simclr.loss.register_loss``: registering imported simclr.loss, so
    a config that names a built-in one (every plain run, and --help) is checked without importing torch."""
    if name in LOSSES:
        return True
    loss = sys.modules.get("simclr.loss")
    return isinstance(name, str) and loss is not None and name in loss.LOSSES


def _path(v):
    return "" if isinstance(v, str) and v.lower() == "none" else v


ENCODE_LAYER_HELP = ("representation: h (the encoder's output, the default), g1, g2 (g3 with a 3-layer head: the "
                     "output of that projection-head block; SimCLR v2 fine-tunes from g1) or z (the head's output)")


@dataclass
class CommonConfig:
    """Options shared by every job (pretraining and evaluation)."""

    problem: str = option("sim-clr", "which job: sim-clr (pretraining), eval (linear evaluation) or "
                          "semi-supervised-eval (the spec's semi-supervised protocol)", PROBLEMS, trajectory=False)
    name: str = option("", "run name; the run folder is <root>/<name>/<run-id>/ (default: the config file's stem)",
                       trajectory=False, knn=True, bookkeeping=True)
    root: str = option("", "folder holding all runs (default: $SIMCLR_LOGS or $EXMAN_PATH or ./logs)",
                       convert=_path, trajectory=False, per_process=True, knn=True, bookkeeping=True)
    data: str = option("cifar10", f"dataset: {', '.join(DATASETS)} (alias cifar = cifar10; folder = any image "
                       f"folder, --data_path)", DATASETS, convert=_data, trajectory=True, knn=True)
    # not a trajectory option, and each process's own: a staged copy, or each node's copy at its own path, is the
    # same data (a resume and the ranks compare the images' content identity instead)
    data_path: str = option("", "image folder with train/ and test/ (or val/) sub-folders, for --data folder",
                            trajectory=False, per_process=True, knn=True)
    image_size: int = option(0, "input side in pixels; 0 = the dataset's own (32 CIFAR, 96 STL-10, 224 otherwise)",
                             **within(0, MAX_SIDE), trajectory=False, knn=True)
    arch: str = option("resnet50", ARCH_HELP, convert=_arch, trajectory=True, shapes=True)
    timm_kwargs: str = option("", "extra timm.create_model arguments for a timm: arch, as a JSON object (YAML: a "
                              "mapping), e.g. '{\"patch_size\": 4}' for a ViT on 32 px images; img_size is "
                              "--image_size (passed to models that take it)", convert=canonical_kwargs,
                              trajectory=True, shapes=True, knn=True)
    batch_size: int = option(256, "global number of unique images per step (split over all processes)",
                             **within(1, MAX_BATCH), trajectory=True)
    iters: int = option(1000, "number of optimizer steps", **within(1, MAX_ITERS), trajectory=True)
    lr: float = option(1.0, "peak learning rate", check=nonneg, check_msg="must be >= 0", trajectory=True)
    lr_schedule: str = option("warmup-anneal", "warmup-anneal (linear warmup then cosine to 0), linear, const",
                           ["warmup-anneal", "linear", "const"], trajectory=True)
    warmup: float = option(0.01, "fraction of iters spent in linear warmup", check=lambda x: 0 <= x <= 1,
                        check_msg="must be within [0, 1]", trajectory=True)
    opt: str = option("lars", "optimizer: lars, sgd (momentum 0.9), adam", ["lars", "sgd", "adam"],
                      trajectory=True, optimizer=True)
    weight_decay: float = option(1e-6, "weight decay", check=nonneg, check_msg="must be >= 0", aliases=("wd",),
                                 trajectory=True)
    momentum: float = compatibility_only("momentum", trajectory=False)
    aug: bool = option(True, "apply random augmentations", trajectory=True)
    scale_lower: float = option(0.08, "lower bound of the random-resized-crop area fraction",
                             check=lambda x: 0 < x <= 1, check_msg="must be within (0, 1]", trajectory=True)
    seed: int = option(-1, "random seed; -1 draws one and records it in the run folder", **seed_range(draw=True),
                       trajectory=True, knn=True)
    workers: int = option(2, "DataLoader worker processes", **within(0, 512), aliases=("j",),
                          trajectory=False, per_process=True, knn=True, bookkeeping=True)
    device: str = option("auto", "auto, cpu or cuda (cuda:N also accepted)",
                         trajectory=False, per_process=True, knn=True, bookkeeping=True)
    precision: str = option("auto", "auto (bf16 autocast on CUDA and on a CPU with native bf16: AVX512-BF16 or "
                         "AMX; fp32 elsewhere), bf16, fp16, fp32 (the loss is fp32 always)",
                         ["auto", "bf16", "fp16", "fp32"], trajectory=False, knn=True)
    eval_freq: int = option(0, "steps between evaluations (kNN monitor in pretraining); 0 = only at the end",
                         check=nonneg, check_msg="must be >= 0", trajectory=False, bookkeeping=True)
    save_freq: int = option(0, "steps between checkpoints; 0 = only at the end", check=nonneg, check_msg="must be >= 0",
                            trajectory=False, bookkeeping=True)
    log_freq: int = option(10, "steps between log lines", check=positive, check_msg="must be > 0", trajectory=False,
                           bookkeeping=True)
    ckpt: str = option("", "checkpoint to resume from (pretraining) or a saved head (eval-only)",
                       convert=_path, trajectory=False, bookkeeping=True)
    verbose: bool = option(True, "print progress", trajectory=False, per_process=True, knn=True, bookkeeping=True)
    dist: str = option("none", "distributed pretraining: none; ddp (one process per GPU of each node, with "
                       "--world_size/--node_rank/--dist_address; or start it with torchrun); dp (the spec's "
                       "single-node mode: one DDP process per visible GPU of this node; one process without a GPU). "
                       "Evaluation runs in one process", ["none", "ddp", "dp"], trajectory=False, bookkeeping=True)
    dist_address: str = option("127.0.0.1:1234", "<address>:<port> of the main node (spec's --dist ddp form)",
                               trajectory=False, per_process=True, bookkeeping=True)
    node_rank: int = option(0, "rank of this node (spec's --dist ddp form)", check=nonneg, check_msg="must be >= 0",
                            trajectory=False, per_process=True, bookkeeping=True)
    world_size: int = option(1, "number of nodes (spec's --dist ddp form)", check=positive, check_msg="must be > 0",
                             trajectory=False)
    train_subset: int = option(0, "use a class-balanced subset of this many training images (0 = all)",
                            check=nonneg, check_msg="must be >= 0", trajectory=True, knn=True)
    test_subset: int = option(0, "use a class-balanced subset of this many test images (0 = all)",
                           check=nonneg, check_msg="must be >= 0", trajectory=False, knn=True)
    deterministic: bool = option(False, "deterministic kernels (bit-exact resume on CPU)", trajectory=False)
    logger: str = option("tensorboard", "experiment trackers fed with the config, every metrics line and the final "
                         "results, comma-separated: tensorboard, wandb (offline, into <run>/wandb), mlflow (a local "
                         "file store, <run>/mlruns); none = only the run folder's files. wandb and mlflow are the "
                         "extras simclr-torch[wandb] / simclr-torch[mlflow]", check=_loggers_ok,
                         check_msg=f"must be a comma-separated list of {', '.join(LOGGERS)} (or none)",
                         trajectory=False, per_process=True, knn=True, bookkeeping=True)
    mlflow_uri: str = option("", "MLflow tracking URI for --logger mlflow (default: the file store "
                             "file:<run folder>/mlruns)", trajectory=False, per_process=True, knn=True,
                             bookkeeping=True)
    model_id: int = compatibility_only("model_id", trajectory=False, bookkeeping=True)

    IGNORED_KEYS = IGNORED_KEYS

    def check(self) -> None:
        """Cross-field checks (after every field's own range check)."""
        if self.name and (Path(self.name).is_absolute() or ".." in Path(self.name).parts):
            raise ConfigError(f"option 'name' got {self.name[:60]!r}: a run name must stay inside --root (no "
                              f"'..', not an absolute path); use --root or --run_dir to choose the folder")
        if self.problem == "sim-clr":
            resolve_encoder(self, "arch", "width", "width_multiplier")
            if getattr(self, "loss", "") == "dcl" and self.batch_size < 2:
                raise ConfigError("--loss dcl needs --batch_size 2 or more: its denominators hold the other images")
        elif getattr(self, "encoder_arch", None) and not getattr(self, "encoder_ckpt", ""):
            resolve_encoder(self, "encoder_arch", "encoder_width")
        if self.data == "folder" and not self.data_path:
            raise ConfigError("--data folder needs --data_path DIR (a folder with train/ and test/ or val/ inside)")

    def finalize(self, config_path: Optional[str]) -> None:
        """Defaults that depend on where the config came from: the run name and the runs root."""
        if not self.name:
            self.name = Path(config_path).stem if config_path else self.problem
        if not self.root:
            self.root = default_root()

    def notes(self) -> list:
        return cap_workers(self)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a SLURM allocation or taskset), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cap_workers(cfg) -> list:
    """More DataLoader workers than usable CPUs only adds processes that wait for each other (and PyTorch's
    warning about it, once per loader): cap ``workers`` there, with a note (a config written for a GPU node,
    e.g. the spec's ``workers: 4``, run on a 2-core machine)."""
    cpus = usable_cpus()
    if cfg.workers <= cpus:
        return []
    return [f"note: --workers {cfg.workers} is more than the {cpus} CPUs this process may use: the worker "
            f"processes will wait for each other (PyTorch warns about it); --workers {cpus} is enough here"]


@dataclass
class PretrainConfig(CommonConfig):
    """SimCLR pretraining. Defaults follow the paper where the spec does not say otherwise."""

    COMMAND = "pretrain"
    IGNORED_KEYS = PRETRAIN_IGNORED_KEYS
    ALTERNATIVES = (("width", "width_multiplier"),)  # one on the command line replaces the other from the file

    # the encoder's width is pretraining's (an evaluation reads it from the checkpoint; --encoder_width for a
    # random one)
    width: int = option(0, "channels of the first ResNet stage (64 = standard, smaller for tiny test models); 0 = "
                        "64 x width_multiplier", **within(0, MAX_WIDTH), trajectory=True, shapes=True)
    width_multiplier: int = option(0, "ResNet width multiplier k of the SimCLR papers (ResNet-50 x2, x4): every "
                                   "channel count times k, i.e. width 64 k; 0 = not given (width decides). Given with "
                                   "--width, they must agree", **within(0, MAX_WIDTH // 64), trajectory=True)
    temperature: float = option(0.5, "temperature of the loss", check=positive, check_msg="must be > 0",
                                trajectory=True)
    loss: str = option("nt-xent", "contrastive loss: nt-xent (SimCLR's) or dcl (decoupled contrastive loss, Yeh et "
                       "al. 2022: the positive taken out of the denominator); also any name registered with "
                       "simclr.loss.register_loss", check=_loss_known,
                       check_msg=f"allowed: {', '.join(LOSSES)}, or a name registered with simclr.loss.register_loss",
                       trajectory=True)
    multiplier: int = option(2, "augmented views per image (m >= 2)", **within(2, 64), trajectory=True)
    color_dist_s: float = option(1.0, "colour distortion strength s", check=nonneg, check_msg="must be >= 0",
                                 trajectory=True)
    blur: str = option("auto", "Gaussian blur: auto (only for images >= 64 px, as the paper), on, off",
                    ["auto", "on", "off"], trajectory=True)
    blur_sigma: str = option("0.1,2.0", "range 'lo,hi' of the Gaussian blur's sigma: 0.1,2.0 is the official "
                             "SimCLR's (and the paper's); the spec's code draws from 0.2,2.0",
                             check=lambda v: _sigma_ok(v), check_msg="must be 'lo,hi' with 0 < lo <= hi",
                             trajectory=True)
    lr_scaling: str = option("none", "official SimCLR learning_rate_scaling: none (lr as given, the spec's), "
                             "linear (lr x batch_size / 256) or sqrt (lr x sqrt(batch_size))",
                             ["none", "linear", "sqrt"], trajectory=True)
    zero_init_residual: bool = option(False, "start the last BN gamma of every residual block at 0 (the official "
                                      "SimCLR ResNet); off = the spec's (gamma 1). Built-in ResNets only",
                                      trajectory=False)
    sync_bn: bool = option(True, "synchronise batch-norm statistics across processes (every batch norm the model has: "
                           "a ViT trunk has none, only the projection head's)", trajectory=False)
    proj_layers: int = option(2, "projection head depth: 2 (SimCLR v1, spec) or 3 (SimCLR v2)", [2, 3],
                              trajectory=False, shapes=True)
    proj_dim: int = option(128, "output dimension of the projection head", **within(1, MAX_COUNT),
                           trajectory=False, shapes=True)
    lars_exclude: str = option("ndim", "parameters LARS leaves without weight decay/adaptation: ndim (every "
                            "1-d param: all BN/LayerNorm weights and biases, all biases; and position embeddings "
                            "and class tokens of ViT-like models) or spec (the spec's name rule: names containing "
                            "'bn' or 'bias')", ["ndim", "spec"], trajectory=False, optimizer=True)
    knn_k: int = option(200, "k of the kNN monitor", **within(1, MAX_COUNT), trajectory=False)
    knn_t: float = option(0.1, "temperature of the weighted kNN monitor", check=positive, check_msg="must be > 0",
                          trajectory=False)
    eval_at_start: bool = option(False, "run the kNN monitor once before the first step (the random-init baseline)",
                                 trajectory=False, bookkeeping=True)
    resume: str = option("", "continue a run: RUN_DIR (its newest valid checkpoint, with its config.yaml as the base "
                         "config) or 'auto' (the run folder --run_dir, else the newest run of this --name; a fresh "
                         "start when it has no checkpoint)", trajectory=False, bookkeeping=True)
    allow_config_change: bool = option(False, "let a resumed run change options that shape its trajectory (iters, "
                                       "lr, batch_size, ...); the old and new values are logged", trajectory=False,
                                       bookkeeping=True)
    run_dir: str = option("", "use this exact run folder instead of creating <root>/<name>/<run-id>",
                          trajectory=False, per_process=True, bookkeeping=True)
    keep_last: int = option(2, "checkpoints kept in the run folder (the newest N)", check=positive,
                         check_msg="must be > 0", trajectory=False, bookkeeping=True)
    on_nan: str = option("stop", "non-finite loss: stop (keep the last good checkpoint) or skip the step",
                      ["stop", "skip"], trajectory=False)
    loader: str = option("auto", "input pipeline: reference (PIL transforms in workers), fast (batched tensor "
                      "augmentation, on the GPU when there is one), auto (fast on CUDA, and on a CPU for "
                      "in-memory datasets: CIFAR, STL-10)",
                      ["auto", "reference", "fast"], trajectory=False)
    channels_last: str = auto_switch("auto", "channels_last memory format: auto (on for CUDA and for a CPU with "
                                     "native bf16, as --precision auto), true, false", trajectory=False)
    compile: str = auto_switch("auto", "torch.compile the model: auto (on for CUDA, falling back to eager with "
                               "one warning when compiling fails; off on the CPU), true (a compile error stops the "
                               "run), false", trajectory=False)
    grad_cache_chunks: int = option(0, "compute the loss gradient of a large batch in this many chunks (0 = off)",
                                 check=nonneg, check_msg="must be >= 0", trajectory=False)
    skip_bad_images: bool = option(False, "skip unreadable images in an image folder (counted) instead of failing",
                                   trajectory=False)
    test_bs: int = option(256, "evaluation batch size (an eval option; accepted and unused by pretraining, as "
                          "in the spec's dumped configs)", check=positive, check_msg="must be > 0", trajectory=False)
    precompute_emb_bs: int = option(-1, "an eval option; accepted and unused by pretraining", trajectory=False)
    online_probe: bool = option(False, "train a linear classifier on the detached h of each step's first view "
                                "alongside pretraining (its own SGD, labels of the training images; the encoder's "
                                "training is unchanged) and log its running top-1 as online_linear_top1",
                                trajectory=False)
    online_probe_lr: float = option(0.1, "learning rate of the online probe (SGD, momentum 0.9, constant)",
                                    check=positive, check_msg="must be > 0", trajectory=False)
    stop_after: int = option(0, "stop (saving a checkpoint, status 'interrupted') after this many steps of this "
                          "invocation, e.g. to fit a job time limit; resume with --ckpt or --resume auto; 0 = off",
                          check=nonneg, check_msg="must be >= 0", trajectory=False, bookkeeping=True)
