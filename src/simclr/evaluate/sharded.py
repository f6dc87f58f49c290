"""kNN over the whole test set with the work split across ranks (the monitor of multi-process
pretraining): each rank embeds 1/W of each set, and the training features stay sharded."""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from .. import distributed
from ..data.datasets import ArrayImages
from .features import extract_features
from .knn import knn_predict, topk_accuracy


def _shard(images, indices: range):
    """Images ``indices`` of a dataset, keeping an in-memory array where there is one (a plain
    ``subset`` of a subset drops it, and the feature extractor would take the PIL path instead)."""
    arr = getattr(images, "images", None)
    if arr is None:
        return images.subset(indices)
    return ArrayImages(arr[indices.start:indices.stop:indices.step], [images.targets[i] for i in indices],
                       images.classes, images.name, images.image_size)


def _merge_candidates(top_sim: torch.Tensor, top_lab: torch.Tensor, k_pad: int, k_all: int):
    """This rank's k_pad best neighbours of a chunk of test rows -> the k_all best of all ranks'."""
    short = k_pad - top_sim.shape[1]
    if short:  # a shard one image short: pad with candidates that never win
        top_sim = torch.cat([top_sim, top_sim.new_full((top_sim.shape[0], short), float("-inf"))], 1)
        top_lab = torch.cat([top_lab, top_lab.new_zeros((top_lab.shape[0], short))], 1)
    all_sim, all_lab = distributed.gather_cat(top_sim, dim=1), distributed.gather_cat(top_lab, dim=1)
    top_sim, pick = all_sim.topk(k_all, dim=1)
    return top_sim, all_lab.gather(1, pick)


@torch.no_grad()
def sharded_knn(encode, train_set, test_set, image_size: int, device: torch.device, amp_dtype,
                k: int = 200, temperature: float = 0.1, batch_size: int = 512, chunk: int = 1024) -> dict:
    """Weighted kNN of the whole test set against the whole training set, each rank embedding
    1/W of each (rank r takes images r, r+W, ...); the result is identical on every rank and
    equals ``knn_classifier`` on one process (up to ties between equal similarities).

    No rank holds all training features: for each chunk of test rows every rank finds the k most
    similar of its own shard, the W candidate lists are gathered and the k best of them are the
    global k nearest neighbours, which then vote exactly as in the one-process kNN."""
    world, rank = dist.get_world_size(), dist.get_rank()
    # labels of the (sub)sets are plain lists on every rank: the class count needs no collective
    num_classes = int(max(max(train_set.targets), max(test_set.targets))) + 1
    if len(train_set) < world or len(test_set) < world:  # too small to split: every rank does it all
        tr_idx, te_idx = range(len(train_set)), range(len(test_set))
    else:
        tr_idx, te_idx = range(rank, len(train_set), world), range(rank, len(test_set), world)
    tr_f, tr_y = extract_features(encode, _shard(train_set, tr_idx), image_size, batch_size, 0, device, amp_dtype)
    te_f, te_y = extract_features(encode, _shard(test_set, te_idx), image_size, batch_size, 0, device, amp_dtype)
    if len(te_idx) != len(test_set):
        te_sizes = [len(range(r, len(test_set), world)) for r in range(world)]
        te_f, te_y = distributed.gather_rows(te_f, te_sizes), distributed.gather_rows(te_y, te_sizes)
    merge = None
    if len(tr_idx) != len(train_set):
        # every rank must offer as many candidates (all_gather), so the longest shard sets the count
        k_pad = min(k, max(len(range(r, len(train_set), world)) for r in range(world)))
        merge = partial(_merge_candidates, k_pad=k_pad, k_all=min(k, len(train_set)))
        k = k_pad
    scores = knn_predict(tr_f, tr_y, te_f, k, temperature, num_classes=num_classes, chunk=chunk, merge=merge)
    res = topk_accuracy(scores, te_y)
    return {"knn_top1": res["top1"], "knn_top5": res["top5"]}
