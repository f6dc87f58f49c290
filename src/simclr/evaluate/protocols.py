"""The evaluation protocols as functions on tensors (DINO's eval_knn/eval_linear split): features and labels
in, accuracies out. Reading encoders, images, caches and run folders is the job's work (:mod:`.run`).

Shapes: train features ``(N, d)`` or ``(K, N, d)`` for K augmented copies, labels ``(N,)``; test features
``(M, d)`` or ``(K, M, d)`` (the copies' predictions are averaged).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from .fast_linear import fast_linear_probe
from .knn import accuracy_report, knn_predict
from .linear import predict, train_on_features

Split = tuple  # (features, labels)


def head_eval(head, test: Split, classes: Sequence[str], unlabeled: Optional[Split] = None) -> tuple[dict, dict]:
    """A trained linear head on the test split -> (accuracy report, details); with ``unlabeled`` also its
    top-1 on the unlabelled rest of the training split (the spec's ``acc_on_unlabeled``)."""
    res = accuracy_report(predict(head, test[0]), test[1], classes)
    details = {}
    if unlabeled is not None:
        details["unlabeled_top1"] = accuracy_report(predict(head, unlabeled[0]), unlabeled[1], classes)["top1"]
        details["n_unlabeled"] = len(unlabeled[1])
    return res, details


def linear_eval(train: Split, test: Split, classes: Sequence[str], cfg, seed: int, progress: bool = False,
                on_step: Optional[Callable] = None, unlabeled: Optional[Split] = None,
                start: Optional[Callable] = None):
    """The spec's linear head (zero init, SGD, cfg's schedule) on precomputed features -> (head, report, details);
    ``start`` and ``on_step`` as :func:`.linear.train_on_features` takes them (resume, checkpoints, stop)."""
    head = train_on_features(train[0], train[1], len(classes), cfg, seed=seed, progress=progress, on_step=on_step,
                             start=start)
    res, details = head_eval(head, test, classes, unlabeled)
    return head, res, dict(details, fit="sgd")


def fast_linear_eval(train: Split, test: Split, classes: Sequence[str], l2_grid: Sequence[float], holdout: float,
                     iters: int, seed: int, unlabeled: Optional[Split] = None):
    """L-BFGS logistic regression with the L2 weight chosen on a held-out part -> (head, report, details)."""
    head, details = fast_linear_probe(train[0], train[1], len(classes), l2_grid, holdout, iters, seed=seed)
    res, extra = head_eval(head, test, classes, unlabeled)
    return head, res, dict(details, **extra, fit="lbfgs")


def knn_eval(train: Split, test: Split, classes: Sequence[str], k: int, temperature: float, vote: str,
             unlabeled: Optional[Split] = None) -> tuple[dict, dict]:
    """kNN on cosine similarity (``vote``: weighted by exp(sim/T), or majority) -> (report, details)."""
    weighted = vote == "weighted"
    tr_f, tr_y = train
    res = accuracy_report(knn_predict(tr_f, tr_y, test[0], k, temperature, weighted, len(classes)), test[1], classes)
    details = {"k": min(k, len(tr_y)), "vote": vote, "similarity": "cosine"}
    if weighted:
        details["temperature"] = temperature
    if unlabeled is not None:
        scores = knn_predict(tr_f, tr_y, unlabeled[0], k, temperature, weighted, len(classes))
        details["unlabeled_top1"] = accuracy_report(scores, unlabeled[1])["top1"]
    return res, details


def protocol_variant(cfg, aug: str) -> str:
    """What the head was trained and tested on, named for eval.json ``details.protocol_variant``:
    on-the-fly (the spec's problem eval: a fresh augmentation every step, frozen encoder in eval
    mode), precomputed-augmented-copies (n_augs_train fixed copies), precomputed-features (aug off:
    one plain image each), finetune; then ``+test-time-averaging`` when n_augs_test copies of each
    test image are averaged (otherwise one plain test image per test sample)."""
    augmenting = aug != "none"
    if cfg.eval_only:
        train = "eval-only"
    elif cfg.finetune and cfg.protocol == "linear":
        train = "finetune"
    elif augmenting and cfg.n_augs_train > 0:
        train = "precomputed-augmented-copies"
    elif augmenting and cfg.protocol == "linear":
        train = "on-the-fly"
    else:
        train = "precomputed-features"
    tta = augmenting and cfg.n_augs_test > 0 and cfg.protocol != "knn"
    return train + ("+test-time-averaging" if tta else "")
