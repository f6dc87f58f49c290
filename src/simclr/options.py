"""The option schemas of ``simclr pretrain`` and ``simclr eval`` (also the spec's ``python train.py``).

Every option is a field with a default, a help text and, where it matters, the allowed values or a range;
:mod:`simclr.config` turns YAML and the command line into these. The spec's key names are the option
names, so its YAML files and command lines work unchanged.
"""
from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Optional

from .config import auto_switch, fields, finite_numbers, nonneg, option, positive, seed_range, type_of
from .errors import ConfigError
from .names import (BASE_WIDTH, DATA_ALIASES, DATASETS, RESNETS, blur_sigma_range, canonical_kwargs, is_timm,
                    resolve_width, split_arch)

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


def _lower(v):
    return v.lower() if isinstance(v, str) else v


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
    if is_timm(arch):
        from .models.timm_trunk import check_name  # a timm name is checked by timm itself (imports torch)
        check_name(arch)
        given = [f"--{k} {getattr(cfg, k)}" for k in (width_key, mult_key) if k and getattr(cfg, k)]
        if given:
            raise ConfigError(f"{' and '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to the built-in ResNets, "
                              f"not to {arch}: choose a wider timm model or set its own arguments with --timm_kwargs")
        if getattr(cfg, "zero_init_residual", False):
            raise ConfigError(f"--zero_init_residual applies to the built-in ResNets, not to {arch}; pass the "
                              f"model's own argument in --timm_kwargs (timm ResNets: '{{\"zero_init_last\": true}}')")
        return
    if cfg.timm_kwargs:
        raise ConfigError(f"--timm_kwargs applies to timm: archs only, not to {arch}")
    base, _ = split_arch(arch)
    if base not in RESNETS:
        close = difflib.get_close_matches(base, list(RESNETS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"option '{arch_key}' got {arch!r}; allowed: {', '.join(RESNETS)} (with an optional width "
                          f"multiplier: resnet50x2), or timm:<model name>{hint}")
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


def _grid_ok(v) -> bool:
    grid = finite_numbers("l2_grid", v)
    return bool(grid) and all(g >= 0 for g in grid)


def _path(v):
    return "" if isinstance(v, str) and v.lower() == "none" else v


ENCODE_LAYER_HELP = ("representation: h (the encoder's output, the default), g1, g2 (g3 with a 3-layer head: the "
                     "output of that projection-head block; SimCLR v2 fine-tunes from g1) or z (the head's output)")


@dataclass
class CommonConfig:
    """Options shared by every job (pretraining and evaluation)."""

    problem: str = option("sim-clr", "which job: sim-clr (pretraining), eval (linear evaluation) or "
                          "semi-supervised-eval (the spec's semi-supervised protocol)", PROBLEMS)
    name: str = option("", "run name; the run folder is <root>/<name>/<run-id>/ (default: the config file's stem)")
    root: str = option("", "folder holding all runs (default: $SIMCLR_LOGS or $EXMAN_PATH or ./logs)",
                       convert=_path)
    data: str = option("cifar10", f"dataset: {', '.join(DATASETS)} (alias cifar = cifar10; folder = any image "
                       f"folder, --data_path)", DATASETS, convert=_data)
    data_path: str = option("", "image folder with train/ and test/ (or val/) sub-folders, for --data folder")
    image_size: int = option(0, "input side in pixels; 0 = the dataset's own (32 CIFAR, 96 STL-10, 224 otherwise)",
                             **within(0, MAX_SIDE))
    arch: str = option("resnet50", ARCH_HELP, convert=_arch)
    timm_kwargs: str = option("", "extra timm.create_model arguments for a timm: arch, as a JSON object (YAML: a "
                              "mapping), e.g. '{\"patch_size\": 4}' for a ViT on 32 px images; img_size is "
                              "--image_size (passed to models that take it)", convert=canonical_kwargs)
    batch_size: int = option(256, "global number of unique images per step (split over all processes)",
                             **within(1, MAX_BATCH))
    iters: int = option(1000, "number of optimizer steps", **within(1, MAX_ITERS))
    lr: float = option(1.0, "peak learning rate", check=nonneg, check_msg="must be >= 0")
    lr_schedule: str = option("warmup-anneal", "warmup-anneal (linear warmup then cosine to 0), linear, const",
                           ["warmup-anneal", "linear", "const"])
    warmup: float = option(0.01, "fraction of iters spent in linear warmup", check=lambda x: 0 <= x <= 1,
                        check_msg="must be within [0, 1]")
    opt: str = option("lars", "optimizer: lars, sgd (momentum 0.9), adam", ["lars", "sgd", "adam"])
    weight_decay: float = option(1e-6, "weight decay", check=nonneg, check_msg="must be >= 0", aliases=("wd",))
    momentum: float = compatibility_only("momentum")
    aug: bool = option(True, "apply random augmentations")
    scale_lower: float = option(0.08, "lower bound of the random-resized-crop area fraction",
                             check=lambda x: 0 < x <= 1, check_msg="must be within (0, 1]")
    seed: int = option(-1, "random seed; -1 draws one and records it in the run folder", **seed_range(draw=True))
    workers: int = option(2, "DataLoader worker processes", **within(0, 512), aliases=("j",))
    device: str = option("auto", "auto, cpu or cuda (cuda:N also accepted)")
    precision: str = option("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32",
                         ["auto", "bf16", "fp16", "fp32"])
    eval_freq: int = option(0, "steps between evaluations (kNN monitor in pretraining); 0 = only at the end",
                         check=nonneg, check_msg="must be >= 0")
    save_freq: int = option(0, "steps between checkpoints; 0 = only at the end", check=nonneg, check_msg="must be >= 0")
    log_freq: int = option(10, "steps between log lines", check=positive, check_msg="must be > 0")
    ckpt: str = option("", "checkpoint to resume from (pretraining) or a saved head (eval-only)",
                       convert=_path)
    verbose: bool = option(True, "print progress")
    dist: str = option("none", "distributed pretraining: none; ddp (one process per GPU of each node, with "
                       "--world_size/--node_rank/--dist_address; or start it with torchrun); dp (the spec's "
                       "single-node mode: one DDP process per visible GPU of this node; one process without a GPU). "
                       "Evaluation runs in one process", ["none", "ddp", "dp"])
    dist_address: str = option("127.0.0.1:1234", "<address>:<port> of the main node (spec's --dist ddp form)")
    node_rank: int = option(0, "rank of this node (spec's --dist ddp form)", check=nonneg, check_msg="must be >= 0")
    world_size: int = option(1, "number of nodes (spec's --dist ddp form)", check=positive, check_msg="must be > 0")
    train_subset: int = option(0, "use a class-balanced subset of this many training images (0 = all)",
                            check=nonneg, check_msg="must be >= 0")
    test_subset: int = option(0, "use a class-balanced subset of this many test images (0 = all)",
                           check=nonneg, check_msg="must be >= 0")
    deterministic: bool = option(False, "deterministic kernels (bit-exact resume on CPU)")
    logger: str = option("tensorboard", "experiment trackers fed with the config, every metrics line and the final "
                         "results, comma-separated: tensorboard, wandb (offline, into <run>/wandb), mlflow (a local "
                         "file store, <run>/mlruns); none = only the run folder's files. wandb and mlflow are the "
                         "extras simclr-torch[wandb] / simclr-torch[mlflow]", check=_loggers_ok,
                         check_msg=f"must be a comma-separated list of {', '.join(LOGGERS)} (or none)")
    mlflow_uri: str = option("", "MLflow tracking URI for --logger mlflow (default: the file store "
                             "file:<run folder>/mlruns)")
    model_id: int = compatibility_only("model_id")

    IGNORED_KEYS = IGNORED_KEYS

    def check(self) -> None:
        """Cross-field checks (after every field's own range check)."""
        if self.name and (Path(self.name).is_absolute() or ".." in Path(self.name).parts):
            raise ConfigError(f"option 'name' got {self.name[:60]!r}: a run name must stay inside --root (no "
                              f"'..', not an absolute path); use --root or --run_dir to choose the folder")
        if self.problem == "sim-clr":
            resolve_encoder(self, "arch", "width", "width_multiplier")
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


@dataclass
class PretrainConfig(CommonConfig):
    """SimCLR pretraining. Defaults follow the paper where the spec does not say otherwise."""

    COMMAND = "pretrain"
    IGNORED_KEYS = PRETRAIN_IGNORED_KEYS
    ALTERNATIVES = (("width", "width_multiplier"),)  # one on the command line replaces the other from the file

    # the encoder's width is pretraining's (an evaluation reads it from the checkpoint; --encoder_width for a
    # random one)
    width: int = option(0, "channels of the first ResNet stage (64 = standard, smaller for tiny test models); 0 = "
                        "64 x width_multiplier", **within(0, MAX_WIDTH))
    width_multiplier: int = option(0, "ResNet width multiplier k of the SimCLR papers (ResNet-50 x2, x4): every "
                                   "channel count times k, i.e. width 64 k; 0 = not given (width decides). Given with "
                                   "--width, they must agree", **within(0, MAX_WIDTH // 64))
    temperature: float = option(0.5, "temperature of the loss", check=positive, check_msg="must be > 0")
    loss: str = option("nt-xent", "contrastive loss: nt-xent (SimCLR's) or dcl (decoupled contrastive loss, Yeh et "
                       "al. 2022: the positive taken out of the denominator); also any name registered with "
                       "simclr.loss.register_loss", check=_loss_known,
                       check_msg=f"allowed: {', '.join(LOSSES)}, or a name registered with simclr.loss.register_loss")
    multiplier: int = option(2, "augmented views per image (m >= 2)", **within(2, 64))
    color_dist_s: float = option(1.0, "colour distortion strength s", check=nonneg, check_msg="must be >= 0")
    blur: str = option("auto", "Gaussian blur: auto (only for images >= 64 px, as the paper), on, off",
                    ["auto", "on", "off"])
    blur_sigma: str = option("0.1,2.0", "range 'lo,hi' of the Gaussian blur's sigma: 0.1,2.0 is the official "
                             "SimCLR's (and the paper's); the spec's code draws from 0.2,2.0",
                             check=lambda v: _sigma_ok(v), check_msg="must be 'lo,hi' with 0 < lo <= hi")
    lr_scaling: str = option("none", "official SimCLR learning_rate_scaling: none (lr as given, the spec's), "
                             "linear (lr x batch_size / 256) or sqrt (lr x sqrt(batch_size))",
                             ["none", "linear", "sqrt"])
    zero_init_residual: bool = option(False, "start the last BN gamma of every residual block at 0 (the official "
                                      "SimCLR ResNet); off = the spec's (gamma 1). Built-in ResNets only")
    sync_bn: bool = option(True, "synchronise batch-norm statistics across processes (every batch norm the model has: "
                           "a ViT trunk has none, only the projection head's)")
    proj_layers: int = option(2, "projection head depth: 2 (SimCLR v1, spec) or 3 (SimCLR v2)", [2, 3])
    proj_dim: int = option(128, "output dimension of the projection head", **within(1, MAX_COUNT))
    lars_exclude: str = option("ndim", "parameters LARS leaves without weight decay/adaptation: ndim (every "
                            "1-d param: all BN/LayerNorm weights and biases, all biases; and position embeddings "
                            "and class tokens of ViT-like models) or spec (the spec's name rule: names containing "
                            "'bn' or 'bias')", ["ndim", "spec"])
    knn_k: int = option(200, "k of the kNN monitor", **within(1, MAX_COUNT))
    knn_t: float = option(0.1, "temperature of the weighted kNN monitor", check=positive, check_msg="must be > 0")
    eval_at_start: bool = option(False, "run the kNN monitor once before the first step (the random-init baseline)")
    resume: str = option("", "continue a run: RUN_DIR (its newest valid checkpoint, with its config.yaml as the base "
                         "config) or 'auto' (the run folder --run_dir, else the newest run of this --name; a fresh "
                         "start when it has no checkpoint)")
    allow_config_change: bool = option(False, "let a resumed run change options that shape its trajectory (iters, "
                                       "lr, batch_size, ...); the old and new values are logged")
    run_dir: str = option("", "use this exact run folder instead of creating <root>/<name>/<run-id>")
    keep_last: int = option(2, "checkpoints kept in the run folder (the newest N)", check=positive,
                         check_msg="must be > 0")
    on_nan: str = option("stop", "non-finite loss: stop (keep the last good checkpoint) or skip the step",
                      ["stop", "skip"])
    loader: str = option("auto", "input pipeline: reference (PIL transforms in workers), fast (batched tensor "
                      "augmentation, on the GPU when there is one), auto (fast on CUDA)",
                      ["auto", "reference", "fast"])
    channels_last: str = auto_switch("auto", "channels_last memory format: auto (on for CUDA, off on the CPU), "
                                     "true, false")
    compile: str = auto_switch("auto", "torch.compile the model: auto (on for CUDA, falling back to eager with "
                               "one warning when compiling fails; off on the CPU), true (a compile error stops the "
                               "run), false")
    grad_cache_chunks: int = option(0, "compute the loss gradient of a large batch in this many chunks (0 = off)",
                                 check=nonneg, check_msg="must be >= 0")
    skip_bad_images: bool = option(False, "skip unreadable images in an image folder (counted) instead of failing")
    test_bs: int = option(256, "evaluation batch size (an eval option; accepted and unused by pretraining, as "
                          "in the spec's dumped configs)", check=positive, check_msg="must be > 0")
    precompute_emb_bs: int = option(-1, "an eval option; accepted and unused by pretraining")
    online_probe: bool = option(False, "train a linear classifier on the detached h of each step's first view "
                                "alongside pretraining (its own SGD, labels of the training images; the encoder's "
                                "training is unchanged) and log its running top-1 as online_linear_top1")
    online_probe_lr: float = option(0.1, "learning rate of the online probe (SGD, momentum 0.9, constant)",
                                    check=positive, check_msg="must be > 0")
    stop_after: int = option(0, "stop (saving a checkpoint, status 'interrupted') after this many steps of this "
                          "invocation, e.g. to fit a job time limit; resume with --ckpt or --resume auto; 0 = off",
                          check=nonneg, check_msg="must be >= 0")


@dataclass
class EvalConfig(CommonConfig):
    """Evaluation of a (frozen or fine-tuned) encoder. Key names follow the spec's ``problem: eval``;
    defaults are the spec's CIFAR-10 linear-evaluation values except ``iters`` (80,000 in
    configs/cifar_eval.yaml) and the augmented copies, kept small so a plain command finishes on a CPU."""

    COMMAND = "eval"

    problem: str = option("eval", "which job: eval (linear evaluation: augmentation on the fly, plain test "
                          "images), semi-supervised-eval (the spec's semi-supervised protocol: train_size, "
                          "n_augs_*, acc_on_unlabeled) or sim-clr (pretraining)", PROBLEMS)
    arch: str = compatibility_only("arch", convert=_lower)
    protocol: str = option("linear", "linear (the spec's SGD linear evaluation), fast-linear (features once, "
                           "L-BFGS logistic regression, L2 picked on a held-out split), knn",
                           ["linear", "fast-linear", "knn"])
    encoder_ckpt: str = option("", "encoder checkpoint (ours, a run folder = its newest valid one, a .json card, "
                               "the spec's .pth.tar, or an export); empty = a randomly initialised encoder "
                               "(a baseline)",
                               convert=_path)
    encoder_arch: str = option("resnet50", "architecture of the random encoder used when encoder_ckpt is empty (as "
                               "pretraining's --arch: resnet50x2, timm:<name> with --timm_kwargs ...)", convert=_arch)
    encoder_width: int = option(0, "width of the random ResNet used when encoder_ckpt is empty (0 = 64 x the "
                                "arch's multiplier)", **within(0, MAX_WIDTH))
    trust_checkpoint: bool = option(False, "allow full unpickling of checkpoints that need it (trusted files only)")
    encode_layer: str = option("h", ENCODE_LAYER_HELP)
    batch_size: int = option(1024, "training batch size of the linear head", **within(1, MAX_BATCH))
    iters: int = option(5000, "optimizer steps of the linear head (the spec's CIFAR-10 config: 80000)",
                        **within(1, MAX_ITERS))
    lr: float = option(0.1, "learning rate of the linear head", check=nonneg, check_msg="must be >= 0")
    lr_schedule: str = option("linear", "linear (the spec's decay to 0), warmup-anneal, const",
                              ["warmup-anneal", "linear", "const"])
    warmup: float = option(0.0, "fraction of iters spent in linear warmup (warmup-anneal only)",
                           check=lambda x: 0 <= x <= 1, check_msg="must be within [0, 1]")
    opt: str = option("sgd", "optimizer: sgd (momentum 0.9, the spec's) or adam", ["sgd", "adam"])
    weight_decay: float = option(1e-4, "weight decay of the linear head (and encoder when fine-tuning)",
                                 check=nonneg, check_msg="must be >= 0")
    augmentation: str = option("RandomCrop", "train-time augmentation: RandomCrop (pad 4, reflect) + flip, "
                               "RandomResizedCrop + flip, or none (also: aug false)",
                               ["RandomCrop", "RandomResizedCrop", "none"])
    precompute_emb_bs: int = option(-1, "batch size for precomputing features once (no augmentation); -1 = "
                                    "test_bs. Without augmentation features are always computed once")
    n_augs_train: int = option(-1, "semi-supervised-eval: precompute features of this many augmented copies of "
                               "the training set and train on all of them (-1 = augment on the fly). Like the "
                               "spec, problem eval ignores it")
    n_augs_test: int = option(-1, "semi-supervised-eval: average the predictions over this many augmented copies "
                              "of each test image (-1 = the plain test image). Like the spec, problem eval "
                              "ignores it")
    test_bs: int = option(1024, "batch size for feature extraction and testing", **within(1, MAX_BATCH))
    finetune: bool = option(False, "fine-tune the whole encoder (SGD) instead of freezing it")
    encoder_lr: float = option(-1.0, "learning rate of the encoder when fine-tuning (-1 = lr)")
    train_size: int = option(-1, "labelled training images, drawn class-balanced with data_split_seed "
                             "(-1 = all; e.g. 500 = 1% of CIFAR-10)")
    data_split_seed: int = option(42, "seed of the train_size draw", **seed_range(draw=False))
    acc_on_unlabeled: bool = option(False, "also report accuracy on the training images left out by train_size")
    eval_only: bool = option(False, "evaluate a saved head (--ckpt) on the encoder without training")
    ckpt_iter: int = option(0, "steps between head checkpoints during linear training (0 or -1, the spec's "
                            "'not set' = only at the end)", check=lambda x: x >= -1, check_msg="must be >= -1")
    compare: bool = option(False, "run both linear and fast-linear and print both")
    k: int = option(200, "neighbours of the kNN protocol", **within(1, MAX_COUNT))
    temperature: float = option(0.1, "temperature of the weighted kNN", check=positive, check_msg="must be > 0")
    knn_vote: str = option("weighted", "kNN vote: weighted (exp(sim/T), InstDisc) or majority",
                           ["weighted", "majority"])
    l2_grid: str = option("1e-5,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,0.1,1",
                          "fast-linear: L2 strengths tried (comma separated; the penalty is l2/2 * ||W||^2 on "
                          "standardised features)", check=lambda v: _grid_ok(v),
                          check_msg="must be one or more finite numbers >= 0")
    holdout: float = option(0.1, "fast-linear: fraction of the training split held out to pick the L2 strength",
                            check=lambda x: 0 < x < 1, check_msg="must be within (0, 1)")
    fast_iters: int = option(300, "fast-linear: L-BFGS iterations per fit", **within(1, MAX_COUNT))
    cache_features: bool = option(True, "reuse features cached on disk, keyed by encoder hash + data + transform")
    run_dir: str = option("", "write into this exact run folder instead of <root>/<name>/<run-id>")

    def notes(self) -> list:
        """Values accepted that change nothing, said once each. The spec's eval configs carry ``dist: dp``
        (evaluation here is one process). The spec's ``problem: eval`` (its SSLEval) has no n_augs_*: its
        dumped cifar_eval.yaml carries n_augs_train 10 / n_augs_test 50 that its code never reads."""
        out = []
        if self.dist != "none":
            out.append(f"note: evaluation runs in one process; --dist {self.dist} applies to pretraining only")
        set_ = [f"{k}: {getattr(self, k)}" for k in ("n_augs_train", "n_augs_test") if getattr(self, k) != -1]
        if self.problem == "eval" and set_:
            self.n_augs_train = self.n_augs_test = -1
            out.append(f"note: ignoring {', '.join(set_)}: problem eval trains on augmentation on the fly and tests "
                       f"on the plain images, as the spec's code does; use --problem semi-supervised-eval for "
                       f"augmented copies / test-time averaging")
        return out




# `simclr knn` is `simclr eval --protocol knn` with only the options that protocol reads, so its --help lists
# those and nothing else. Built from EvalConfig's fields: one help text and one range per option.
KNN_KEYS = ("name", "root", "data", "data_path", "image_size", "encoder_ckpt", "encoder_arch", "encoder_width",
            "trust_checkpoint", "encode_layer", "k", "temperature", "knn_vote", "train_subset", "test_subset",
            "train_size", "data_split_seed", "test_bs", "precompute_emb_bs", "cache_features", "seed", "workers",
            "device", "precision", "verbose", "run_dir", "logger", "mlflow_uri", "timm_kwargs")


def _knn_finalize(self, config_path: Optional[str]) -> None:
    self.name = self.name or (Path(config_path).stem if config_path else "knn")
    self.root = self.root or default_root()


KnnConfig = make_dataclass(
    "KnnConfig",
    [(f.name, type_of(EvalConfig, f), field(default=f.default, metadata=f.metadata))
     for f in fields(EvalConfig) if f.name in KNN_KEYS],
    namespace={"__doc__": "kNN accuracy of an encoder's frozen features: each test image takes the (weighted) "
                          "vote of its k nearest training images by cosine similarity. Same as `simclr eval "
                          "--protocol knn`.",
               "COMMAND": "knn", "IGNORED_KEYS": IGNORED_KEYS + ("problem", "protocol"),
               "OTHER": ("eval", EvalConfig), "finalize": _knn_finalize})
KnnConfig.__module__ = __name__

