"""The option schemas of ``simclr eval`` (also the spec's ``python train.py --problem eval``) and ``simclr knn``.

Apart from :mod:`simclr.options` (the options every job shares, and pretraining's) as :mod:`simclr.export_options`
is: one file per command family. The value helpers (ranges, spellings, the encoder's canonical form) are
:mod:`simclr.options`'s.
"""
from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Optional

from .config import fields, finite_numbers, nonneg, option, positive, seed_range, type_of, with_role
from .options import (ENCODE_LAYER_HELP, IGNORED_KEYS, MAX_BATCH, MAX_COUNT, MAX_ITERS, MAX_WIDTH, PROBLEMS,
                      CommonConfig, _arch, _path, cap_workers, compatibility_only, default_root, within)


def _lower(v):
    return v.lower() if isinstance(v, str) else v


def _grid_ok(v) -> bool:
    grid = finite_numbers("l2_grid", v)
    return bool(grid) and all(g >= 0 for g in grid)


@dataclass
class EvalConfig(CommonConfig):
    """Evaluation of a (frozen or fine-tuned) encoder. Key names follow the spec's ``problem: eval``;
    defaults are the spec's CIFAR-10 linear-evaluation values except ``iters`` (80,000 in
    configs/cifar_eval.yaml) and the augmented copies, kept small so a plain command finishes on a CPU."""

    COMMAND = "eval"

    problem: str = option("eval", "which job: eval (linear evaluation: augmentation on the fly, plain test "
                          "images), semi-supervised-eval (the spec's semi-supervised protocol: train_size, "
                          "n_augs_*, acc_on_unlabeled) or sim-clr (pretraining)", PROBLEMS, trajectory=True)
    arch: str = compatibility_only("arch", convert=_lower, trajectory=False)
    protocol: str = option("linear", "linear (the spec's SGD linear evaluation), fast-linear (features once, "
                           "L-BFGS logistic regression, L2 picked on a held-out split), knn",
                           ["linear", "fast-linear", "knn"], trajectory=True)
    skip_bad_images: bool = option(False, "skip unreadable images in an image folder (counted, named in a warning) "
                                   "instead of failing; the accuracy is then over the readable test images",
                                   knn=True, trajectory=False)
    encoder_ckpt: str = option("", "encoder checkpoint (ours, a run folder = its newest valid one, a .json card, "
                               "the spec's .pth.tar, or an export); empty = a randomly initialised encoder "
                               "(a baseline)",
                               convert=_path, knn=True, trajectory=False)
    encoder_arch: str = option("resnet50", "architecture of the random encoder used when encoder_ckpt is empty (as "
                               "pretraining's --arch: resnet50x2, timm:<name> with --timm_kwargs ...)", convert=_arch,
                               knn=True, trajectory=True)
    encoder_width: int = option(0, "width of the random ResNet used when encoder_ckpt is empty (0 = 64 x the "
                                "arch's multiplier)", **within(0, MAX_WIDTH), knn=True, trajectory=True)
    trust_checkpoint: bool = option(False, "allow full unpickling of checkpoints that need it (trusted files only)",
                                    knn=True, trajectory=False)
    encode_layer: str = option("h", ENCODE_LAYER_HELP, knn=True, trajectory=True)
    batch_size: int = option(1024, "training batch size of the linear head", **within(1, MAX_BATCH), trajectory=True)
    iters: int = option(5000, "optimizer steps of the linear head (the spec's CIFAR-10 config: 80000)",
                        **within(1, MAX_ITERS), trajectory=True)
    lr: float = option(0.1, "learning rate of the linear head", check=nonneg, check_msg="must be >= 0", trajectory=True)
    lr_schedule: str = option("linear", "linear (the spec's decay to 0), warmup-anneal, const",
                              ["warmup-anneal", "linear", "const"], trajectory=True)
    warmup: float = option(0.0, "fraction of iters spent in linear warmup (warmup-anneal only)",
                           check=lambda x: 0 <= x <= 1, check_msg="must be within [0, 1]", trajectory=True)
    opt: str = option("sgd", "optimizer: sgd (momentum 0.9, the spec's) or adam", ["sgd", "adam"], trajectory=True)
    weight_decay: float = option(1e-4, "weight decay of the linear head (and encoder when fine-tuning)",
                                 check=nonneg, check_msg="must be >= 0", trajectory=True)
    augmentation: str = option("RandomCrop", "train-time augmentation: RandomCrop (pad 4, reflect) + flip, "
                               "RandomResizedCrop + flip, or none (also: aug false)",
                               ["RandomCrop", "RandomResizedCrop", "none"], trajectory=True)
    precompute_emb_bs: int = option(-1, "batch size for precomputing features once (no augmentation); -1 = "
                                    "test_bs. Without augmentation features are always computed once", knn=True,
                                    trajectory=False)
    n_augs_train: int = option(-1, "semi-supervised-eval: precompute features of this many augmented copies of "
                               "the training set and train on all of them (-1 = augment on the fly). Like the "
                               "spec, problem eval ignores it", trajectory=True)
    n_augs_test: int = option(-1, "semi-supervised-eval: average the predictions over this many augmented copies "
                              "of each test image (-1 = the plain test image). Like the spec, problem eval "
                              "ignores it", trajectory=False)
    test_bs: int = option(1024, "batch size for feature extraction and testing", **within(1, MAX_BATCH), knn=True,
                          trajectory=False)
    finetune: bool = option(False, "fine-tune the whole encoder (SGD) instead of freezing it", trajectory=True)
    encoder_lr: float = option(-1.0, "learning rate of the encoder when fine-tuning (-1 = lr)", trajectory=True)
    train_size: int = option(-1, "labelled training images, drawn class-balanced with data_split_seed "
                             "(-1 = all; e.g. 500 = 1% of CIFAR-10)", knn=True, trajectory=True)
    data_split_seed: int = option(42, "seed of the train_size draw", **seed_range(draw=False), knn=True,
                                  trajectory=True)
    acc_on_unlabeled: bool = option(False, "also report accuracy on the training images left out by train_size",
                                    trajectory=False)
    eval_only: bool = option(False, "evaluate a saved head (--ckpt) on the encoder without training", trajectory=False)
    ckpt_iter: int = option(0, "steps between head checkpoints of the SGD linear evaluation, all of them kept (0 or "
                            "-1, the spec's 'not set' = none; --save_freq: the same checkpoints, only the newest "
                            "--keep_last kept)", check=lambda x: x >= -1, check_msg="must be >= -1", trajectory=False)
    compare: bool = option(False, "run both linear and fast-linear and print both", trajectory=False)
    k: int = option(200, "neighbours of the kNN protocol", **within(1, MAX_COUNT), knn=True, trajectory=False)
    temperature: float = option(0.1, "temperature of the weighted kNN", check=positive, check_msg="must be > 0",
                                knn=True, trajectory=False)
    knn_vote: str = option("weighted", "kNN vote: weighted (exp(sim/T), InstDisc) or majority",
                           ["weighted", "majority"], knn=True, trajectory=False)
    l2_grid: str = option("1e-5,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,0.1,1",
                          "fast-linear: L2 strengths tried (comma separated; the penalty is l2/2 * ||W||^2 on "
                          "standardised features)", check=lambda v: _grid_ok(v),
                          check_msg="must be one or more finite numbers >= 0", trajectory=False)
    holdout: float = option(0.1, "fast-linear: fraction of the training split held out to pick the L2 strength",
                            check=lambda x: 0 < x < 1, check_msg="must be within (0, 1)", trajectory=False)
    fast_iters: int = option(300, "fast-linear: L-BFGS iterations per fit", **within(1, MAX_COUNT), trajectory=False)
    cache_features: bool = option(True, "reuse features cached on disk, keyed by encoder hash + data + transform",
                                  knn=True, trajectory=False)
    run_dir: str = option("", "write into this exact run folder instead of <root>/<name>/<run-id>", knn=True,
                          trajectory=False, bookkeeping=True)
    resume: str = option("", "continue an interrupted SGD linear evaluation (--protocol linear): RUN_DIR (its newest "
                         "valid head checkpoint, with its config.yaml as the base config) or 'auto' (the run folder "
                         "--run_dir, else the newest unfinished evaluation of this --name; a fresh start when there "
                         "is none)",
                         trajectory=False, bookkeeping=True)
    stop_after: int = option(0, "stop the SGD linear evaluation (saving a head checkpoint, status 'interrupted') "
                             "after this many steps of this invocation; continue with --resume; 0 = off",
                             check=nonneg, check_msg="must be >= 0", trajectory=False, bookkeeping=True)
    keep_last: int = option(2, "head checkpoints written for --save_freq kept (the newest N; those of --ckpt_iter "
                            "are all kept)", check=positive, check_msg="must be > 0", trajectory=False,
                            bookkeeping=True)

    def notes(self) -> list:
        """Values accepted that change nothing, said once each. The spec's eval configs carry ``dist: dp``
        (evaluation here is one process). The spec's ``problem: eval`` (its SSLEval) has no n_augs_*: its
        dumped cifar_eval.yaml carries n_augs_train 10 / n_augs_test 50 that its code never reads."""
        out = cap_workers(self)
        if self.dist != "none":
            out.append(f"note: evaluation runs in one process; --dist {self.dist} applies to pretraining only")
        set_ = [f"{k}: {getattr(self, k)}" for k in ("n_augs_train", "n_augs_test") if getattr(self, k) != -1]
        if self.problem == "eval" and set_:
            self.n_augs_train = self.n_augs_test = -1
            out.append(f"note: ignoring {', '.join(set_)}: problem eval trains on augmentation on the fly and tests "
                       f"on the plain images, as the spec's code does; use --problem semi-supervised-eval for "
                       f"augmented copies / test-time averaging")
        return out


# `simclr knn` is `simclr eval --protocol knn` with only the options that protocol reads (their role ``knn``), so
# its --help lists those and nothing else. Built from EvalConfig's fields: one help text and one range per option.
KNN_KEYS = with_role(EvalConfig, "knn")


def _knn_finalize(self, config_path: Optional[str]) -> None:
    self.name = self.name or (Path(config_path).stem if config_path else "knn")
    self.root = self.root or default_root()


KnnConfig = make_dataclass(
    "KnnConfig",
    [(f.name, type_of(EvalConfig, f), field(default=f.default, metadata=f.metadata))
     for f in fields(EvalConfig) if f.metadata.get("knn")],
    namespace={"__doc__": "kNN accuracy of an encoder's frozen features: each test image takes the (weighted) "
                          "vote of its k nearest training images by cosine similarity. Same as `simclr eval "
                          "--protocol knn`.",
               "COMMAND": "knn", "IGNORED_KEYS": IGNORED_KEYS + ("problem", "protocol"),
               "OTHER": ("eval", EvalConfig), "finalize": _knn_finalize, "notes": cap_workers})
KnnConfig.__module__ = __name__

