"""Typed configuration: YAML file first, then ``--key value`` overrides from the command line.

Every option is a dataclass field with a default, a help text and (where it matters) the
allowed values or range. The spec's key names are accepted as they are, so its YAML files
and command lines work unchanged; keys that only describe a past run (``id``, ``time``,
``status`` ...) are accepted and ignored with a note. Anything else unknown is an error
that names the key and suggests the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from .errors import ConfigError

# Keys the spec writes into its saved configs that describe a run rather than configure one.
IGNORED_KEYS = ("id", "time", "status", "tmp", "config_file", "model_id", "number_of_processes", "gpu")

# Accepted spellings of values, mapped to our canonical ones.
ALIASES = {
    "data": {"cifar": "cifar10"},
    "arch": {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50"},
}


def option(default, help: str, choices: Sequence | None = None, check: Callable[[Any], bool] | None = None,
        check_msg: str = "", default_factory=None):
    """A config field: default, help text, allowed values, range check."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "check": check, "check_msg": check_msg}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _positive(x):
    return x > 0


def _nonneg(x):
    return x >= 0


@dataclass
class CommonConfig:
    """Options shared by every job (pretraining and evaluation)."""

    problem: str = option("sim-clr", "which job: sim-clr (pretraining) or eval (evaluation)", ["sim-clr", "eval"])
    name: str = option("", "run name; the run folder is <root>/<name>/<run-id>/ (default: the config file's stem)")
    root: str = option("", "folder holding all runs (default: $SIMCLR_LOGS or $EXMAN_PATH or ./logs)")
    data: str = option("cifar10", "dataset: cifar10 (alias cifar), cifar100, stl10, imagenet, folder",
                    ["cifar10", "cifar100", "stl10", "imagenet", "folder"])
    data_path: str = option("", "image folder with train/ and test/ (or val/) sub-folders, for --data folder")
    image_size: int = option(0, "input side in pixels; 0 = the dataset's own (32 CIFAR, 96 STL-10, 224 otherwise)",
                          check=_nonneg, check_msg="must be >= 0")
    arch: str = option("resnet50", "encoder: resnet18, resnet34, resnet50 (spec spelling ResNet50 accepted)")
    width: int = option(64, "channels of the first ResNet stage (64 = standard); smaller for tiny test models",
                     check=_positive, check_msg="must be > 0")
    batch_size: int = option(256, "global number of unique images per step (split over all processes)",
                          check=_positive, check_msg="must be > 0")
    iters: int = option(1000, "number of optimizer steps", check=_positive, check_msg="must be > 0")
    lr: float = option(1.0, "peak learning rate", check=_nonneg, check_msg="must be >= 0")
    lr_schedule: str = option("warmup-anneal", "warmup-anneal (linear warmup then cosine to 0), linear, const",
                           ["warmup-anneal", "linear", "const"])
    warmup: float = option(0.01, "fraction of iters spent in linear warmup", check=lambda x: 0 <= x <= 1,
                        check_msg="must be within [0, 1]")
    opt: str = option("lars", "optimizer: lars, sgd (momentum 0.9), adam", ["lars", "sgd", "adam"])
    weight_decay: float = option(1e-6, "weight decay", check=_nonneg, check_msg="must be >= 0")
    aug: bool = option(True, "apply random augmentations")
    scale_lower: float = option(0.08, "lower bound of the random-resized-crop area fraction",
                             check=lambda x: 0 < x <= 1, check_msg="must be within (0, 1]")
    seed: int = option(-1, "random seed; -1 draws one and records it in the run folder")
    workers: int = option(2, "DataLoader worker processes", check=_nonneg, check_msg="must be >= 0")
    device: str = option("auto", "auto, cpu or cuda (cuda:N also accepted)")
    precision: str = option("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32",
                         ["auto", "bf16", "fp16", "fp32"])
    eval_freq: int = option(0, "steps between evaluations (kNN monitor in pretraining); 0 = only at the end",
                         check=_nonneg, check_msg="must be >= 0")
    save_freq: int = option(0, "steps between checkpoints; 0 = only at the end", check=_nonneg, check_msg="must be >= 0")
    log_freq: int = option(10, "steps between log lines", check=_positive, check_msg="must be > 0")
    ckpt: str = option("", "checkpoint to resume from (pretraining) or a saved head (eval-only)")
    verbose: bool = option(True, "print progress")
    dist: str = option("none", "distributed mode: none, ddp (one process per GPU), dp (spec compatibility)",
                    ["none", "ddp", "dp"])
    dist_address: str = option("127.0.0.1:1234", "<address>:<port> of the main node (spec's --dist ddp form)")
    node_rank: int = option(0, "rank of this node (spec's --dist ddp form)", check=_nonneg, check_msg="must be >= 0")
    world_size: int = option(1, "number of nodes (spec's --dist ddp form)", check=_positive, check_msg="must be > 0")
    train_subset: int = option(0, "use a class-balanced subset of this many training images (0 = all)",
                            check=_nonneg, check_msg="must be >= 0")
    test_subset: int = option(0, "use a class-balanced subset of this many test images (0 = all)",
                           check=_nonneg, check_msg="must be >= 0")
    deterministic: bool = option(False, "deterministic kernels (bit-exact resume on CPU)")


@dataclass
class PretrainConfig(CommonConfig):
    """SimCLR pretraining. Defaults follow the paper where the spec does not say otherwise."""

    temperature: float = option(0.5, "NT-Xent temperature", check=_positive, check_msg="must be > 0")
    multiplier: int = option(2, "augmented views per image (m >= 2)", check=lambda x: x >= 2, check_msg="must be >= 2")
    color_dist_s: float = option(1.0, "colour distortion strength s", check=_nonneg, check_msg="must be >= 0")
    blur: str = option("auto", "Gaussian blur: auto (only for images >= 64 px, as the paper), on, off",
                    ["auto", "on", "off"])
    sync_bn: bool = option(True, "synchronise batch-norm statistics across processes")
    proj_layers: int = option(2, "projection head depth: 2 (SimCLR v1, spec) or 3 (SimCLR v2)", [2, 3])
    proj_dim: int = option(128, "output dimension of the projection head", check=_positive, check_msg="must be > 0")
    lars_exclude: str = option("ndim", "parameters LARS leaves without weight decay/adaptation: ndim (every "
                            "1-d param: all BN weights/biases and biases) or spec (the spec's name rule: "
                            "names containing 'bn' or 'bias')", ["ndim", "spec"])
    knn_k: int = option(200, "k of the kNN monitor", check=_positive, check_msg="must be > 0")
    knn_t: float = option(0.1, "temperature of the weighted kNN monitor", check=_positive, check_msg="must be > 0")
    eval_at_start: bool = option(False, "run the kNN monitor once before the first step (the random-init baseline)")
    resume: str = option("", "'auto' resumes from the newest valid checkpoint of the run folder given by --run_dir")
    run_dir: str = option("", "use this exact run folder instead of creating <root>/<name>/<run-id>")
    keep_last: int = option(2, "checkpoints kept in the run folder (the newest N)", check=_positive,
                         check_msg="must be > 0")
    on_nan: str = option("stop", "non-finite loss: stop (keep the last good checkpoint) or skip the step",
                      ["stop", "skip"])
    loader: str = option("auto", "input pipeline: reference (PIL transforms in workers), fast (batched tensor "
                      "augmentation, on the GPU when there is one), auto (fast on CUDA)",
                      ["auto", "reference", "fast"])
    channels_last: bool = option(False, "channels_last memory format (faster on GPUs)")
    compile: bool = option(False, "torch.compile the encoder")
    grad_cache_chunks: int = option(0, "compute the loss gradient of a large batch in this many chunks (0 = off)",
                                 check=_nonneg, check_msg="must be >= 0")
    skip_bad_images: bool = option(False, "skip unreadable images in an image folder (counted) instead of failing")
    stop_after: int = option(0, "stop (saving a checkpoint, status 'interrupted') after this many steps of this "
                          "invocation, e.g. to fit a job time limit; resume with --ckpt or --resume auto; 0 = off",
                          check=_nonneg, check_msg="must be >= 0")
    fail_at_step: int = option(-1, "testing aid: make the loss non-finite at this step (-1 = never)")


@dataclass
class EvalConfig(CommonConfig):
    """Evaluation of a (frozen or fine-tuned) encoder. Key names follow the spec's ``problem: eval``;
    defaults are the spec's CIFAR-10 linear-evaluation values except ``iters`` (80,000 in
    configs/cifar_eval.yaml) and the augmented copies, kept small so a plain command finishes on a CPU."""

    problem: str = option("eval", "which job: eval (evaluation) or sim-clr (pretraining)", ["sim-clr", "eval"])
    arch: str = option("linear", "classifier on top of the encoder: linear (the only one, as in the spec)",
                       ["linear"])
    protocol: str = option("linear", "linear (the spec's SGD linear evaluation), fast-linear (features once, "
                           "L-BFGS logistic regression, L2 picked on a held-out split), knn",
                           ["linear", "fast-linear", "knn"])
    encoder_ckpt: str = option("", "encoder checkpoint (ours, the spec's .pth.tar, or an export); empty = a "
                               "randomly initialised encoder (a baseline)")
    encoder_arch: str = option("resnet50", "architecture of the random encoder used when encoder_ckpt is empty")
    encoder_width: int = option(64, "width of the random encoder used when encoder_ckpt is empty",
                                check=_positive, check_msg="must be > 0")
    trust_checkpoint: bool = option(False, "allow full unpickling of checkpoints that need it (trusted files only)")
    encode_layer: str = option("h", "representation: h (encoder output) or g1/g2/g3 (projection-head block "
                               "outputs, SimCLR v2 style) or z")
    batch_size: int = option(1024, "training batch size of the linear head", check=_positive,
                             check_msg="must be > 0")
    iters: int = option(5000, "optimizer steps of the linear head (the spec's CIFAR-10 config: 80000)",
                        check=_positive, check_msg="must be > 0")
    lr: float = option(0.1, "learning rate of the linear head", check=_nonneg, check_msg="must be >= 0")
    lr_schedule: str = option("linear", "linear (the spec's decay to 0), warmup-anneal, const",
                              ["warmup-anneal", "linear", "const"])
    warmup: float = option(0.0, "fraction of iters spent in linear warmup (warmup-anneal only)",
                           check=lambda x: 0 <= x <= 1, check_msg="must be within [0, 1]")
    opt: str = option("sgd", "optimizer: sgd (momentum 0.9, the spec's) or adam", ["sgd", "adam"])
    weight_decay: float = option(1e-4, "weight decay of the linear head (and encoder when fine-tuning)",
                                 check=_nonneg, check_msg="must be >= 0")
    augmentation: str = option("RandomCrop", "train-time augmentation: RandomCrop (pad 4, reflect) + flip, "
                               "RandomResizedCrop + flip, or none (also: aug false)",
                               ["RandomCrop", "RandomResizedCrop", "none"])
    precompute_emb_bs: int = option(-1, "batch size for precomputing features once (no augmentation); -1 = "
                                    "test_bs. Without augmentation features are always computed once")
    n_augs_train: int = option(-1, "precompute features of this many augmented copies of the training set and "
                               "train on all of them (-1 = augment on the fly)")
    n_augs_test: int = option(-1, "average the predictions over this many augmented copies of each test "
                              "image (-1 = the plain test image)")
    test_bs: int = option(1024, "batch size for feature extraction and testing", check=_positive,
                          check_msg="must be > 0")
    finetune: bool = option(False, "fine-tune the whole encoder (SGD) instead of freezing it")
    encoder_lr: float = option(-1.0, "learning rate of the encoder when fine-tuning (-1 = lr)")
    train_size: int = option(-1, "labelled training images, drawn class-balanced with data_split_seed "
                             "(-1 = all; e.g. 500 = 1% of CIFAR-10)")
    data_split_seed: int = option(42, "seed of the train_size draw")
    acc_on_unlabeled: bool = option(False, "also report accuracy on the training images left out by train_size")
    eval_only: bool = option(False, "evaluate a saved head (--ckpt) on the encoder without training")
    ckpt_iter: int = option(0, "steps between head checkpoints during linear training (0 = only at the end)",
                            check=_nonneg, check_msg="must be >= 0")
    compare: bool = option(False, "run both linear and fast-linear and print both")
    k: int = option(200, "neighbours of the kNN protocol", check=_positive, check_msg="must be > 0")
    temperature: float = option(0.1, "temperature of the weighted kNN", check=_positive, check_msg="must be > 0")
    knn_vote: str = option("weighted", "kNN vote: weighted (exp(sim/T), InstDisc) or majority",
                           ["weighted", "majority"])
    l2_grid: str = option("1e-5,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,0.1,1", "fast-linear: L2 strengths tried (comma separated; "
                          "the penalty is l2/2 * ||W||^2 on standardised features)")
    holdout: float = option(0.1, "fast-linear: fraction of the training split held out to pick the L2 strength",
                            check=lambda x: 0 < x < 1, check_msg="must be within (0, 1)")
    fast_iters: int = option(300, "fast-linear: L-BFGS iterations per fit", check=_positive, check_msg="must be > 0")
    cache_features: bool = option(True, "reuse features cached on disk, keyed by encoder hash + data + transform")
    run_dir: str = option("", "write into this exact run folder instead of <root>/<name>/<run-id>")


def default_root() -> str:
    return os.environ.get("SIMCLR_LOGS") or os.environ.get("EXMAN_PATH") or "logs"


def _type_of(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def _parse_bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "y", "on"):
        return True
    if s in ("0", "false", "no", "n", "off"):
        return False
    raise ConfigError(f"option '{key}' expects true or false, got {v!r}")


def coerce(key: str, typ, value: Any):
    """Convert a YAML or command-line value to the field's type, with a clear error."""
    if typ is bool:
        return _parse_bool(key, value)
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"option '{key}' expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            try:  # 1e3 style integers
                fv = float(str(value))
                if fv.is_integer():
                    return int(fv)
            except ValueError:
                pass
            raise ConfigError(f"option '{key}' expects an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"option '{key}' expects a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"option '{key}' expects a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"option '{key}' expects a finite number, got {value!r}")
        return out
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"option '{key}' expects a string, got {value!r}")
        return str(value)
    raise ConfigError(f"option '{key}' has an unsupported type {typ}")  # pragma: no cover


def _normalise(key: str, value: Any) -> Any:
    if key == "arch" and isinstance(value, str):
        return value.lower()
    if isinstance(value, str) and key in ALIASES:
        return ALIASES[key].get(value.lower(), value.lower() if key == "data" else value)
    if key in ("root", "ckpt", "encoder_ckpt") and isinstance(value, str) and value.lower() == "none":
        return ""
    return value


def suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def build(cls, values: dict, source: str = "") -> Any:
    """Create a validated config of dataclass ``cls`` from a plain dict."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str):  # YAML allows `1: x` or `null: x`
            raise ConfigError(f"option names are text, got {key!r}" + (f" (in {source})" if source else ""))
        if key in IGNORED_KEYS:
            continue
        if key not in names:
            where = f" (in {source})" if source else ""
            shown = key if key.isprintable() else repr(key)[1:-1]  # the message stays on one line
            raise ConfigError(f"unknown option '{shown}'{where}{suggest(key, names)} "
                              f"See `simclr {'eval' if cls.__name__.startswith('Eval') else 'pretrain'} --help`.")
        f = names[key]
        typ = _type_of(cls, f)
        v = coerce(key, typ, _normalise(key, value))
        kwargs[key] = v
    cfg = cls(**kwargs)
    validate(cfg)
    return cfg


def validate(cfg) -> None:
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        choices = f.metadata.get("choices")
        if choices and v not in choices:
            close = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1, cutoff=0.4)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"option '{f.name}' got {v!r}; allowed: {', '.join(map(str, choices))}{hint}")
        check = f.metadata.get("check")
        if check is not None and not check(v):
            raise ConfigError(f"option '{f.name}' got {v!r}: {f.metadata.get('check_msg') or 'out of range'}")
    if hasattr(cfg, "arch") and getattr(cfg, "problem", "") == "sim-clr":
        from .models import ENCODERS
        if cfg.arch not in ENCODERS:
            close = difflib.get_close_matches(cfg.arch, list(ENCODERS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"option 'arch' got {cfg.arch!r}; allowed: {', '.join(ENCODERS)}{hint}")
    if getattr(cfg, "data", "") == "folder" and not getattr(cfg, "data_path", ""):
        raise ConfigError("--data folder needs --data_path DIR (a folder with train/ and test/ or val/ inside)")


def load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value, got {type(values).__name__}")
    return values


def split_argv(argv: Sequence[str]) -> tuple[Optional[str], dict]:
    """``['--config', 'a.yaml', '--lr', '1', '--aug=false']`` -> ('a.yaml', {'lr': '1', 'aug': 'false'})."""
    config_path = None
    overrides: dict = {}
    i = 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}: options are written --key value")
        key = a[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and not _is_number(argv[i + 1])):
                raise ConfigError(f"option --{key} needs a value (write --{key} VALUE)")
            value = argv[i + 1]
            i += 2
        key = key.replace("-", "_")
        if key == "config":
            config_path = value
        else:
            overrides[key] = value
    return config_path, overrides


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def parse(cls, argv: Sequence[str], extra: dict | None = None):
    """YAML (``--config``) then command-line overrides, validated into ``cls``.

    Returns (config, notes) where notes are messages for the user (ignored keys...).
    """
    config_path, overrides = split_argv(argv)
    values: dict = {}
    notes = []
    if config_path:
        values.update(load_yaml(config_path))
    values.update(extra or {})
    values.update(overrides)
    ignored = sorted(k for k in values if k in IGNORED_KEYS)
    if ignored:
        notes.append(f"note: ignoring option(s) that only describe a past run: {', '.join(ignored)}")
    # An explicit problem of the other kind is the caller's business (train.py dispatches on it).
    cfg = build(cls, values, source=config_path or "")
    if not cfg.name:
        cfg.name = Path(config_path).stem if config_path else cfg.problem
    if not cfg.root:
        cfg.root = default_root()
    return cfg, notes


def help_text(cls, prog: str) -> str:
    lines = [f"usage: {prog} [--config FILE.yaml] [--key value ...]", "",
             "Options (YAML keys and --key overrides are the same names):", ""]
    for f in dataclasses.fields(cls):
        typ = _type_of(cls, f).__name__
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        extra = f" {{{', '.join(map(str, choices))}}}" if choices else ""
        lines.append(f"  --{f.name} {typ.upper()}{extra}  (default: {default!r})")
        lines.append(f"        {f.metadata.get('help', '')}")
    lines.append("")
    lines.append("Also accepted and ignored (they describe a past run): " + ", ".join(IGNORED_KEYS))
    return "\n".join(lines)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save(cfg, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=True))


def print_notes(notes) -> None:
    for n in notes:
        print(n, file=sys.stderr)
