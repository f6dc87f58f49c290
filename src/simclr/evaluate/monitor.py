"""The kNN monitor of pretraining: weighted kNN of the encoder's ``h`` on a labelled train split -> test split.

With several processes every rank embeds 1/W of both sets and the vote covers all of them
(:func:`simclr.evaluate.sharded.sharded_knn`); alone, the plain feature extraction and the same vote.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed
from .features import extract_features
from .knn import knn_classifier
from .sharded import sharded_knn


def knn_monitor(encoder: nn.Module, train_set, test_set, image_size: int, device: torch.device, amp_dtype,
                k: int = 200, temperature: float = 0.1, progress: bool = False) -> dict:
    """-> {"knn_top1", "knn_top5"} in percent. The encoder is put in eval mode and restored afterwards."""
    was_training = encoder.training
    encoder.eval()
    try:
        if distributed.is_enabled():
            return sharded_knn(encoder, train_set, test_set, image_size, device, amp_dtype, k, temperature)
        tr_f, tr_y = extract_features(encoder, train_set, image_size, 512, 0, device, amp_dtype, progress)
        te_f, te_y = extract_features(encoder, test_set, image_size, 512, 0, device, amp_dtype, progress)
        res = knn_classifier(tr_f, tr_y, te_f, te_y, k=k, temperature=temperature)
    finally:
        encoder.train(was_training)
    return {"knn_top1": res["top1"], "knn_top5": res["top5"]}
