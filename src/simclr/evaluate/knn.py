"""kNN classification on frozen features: weighted (InstDisc, k=200, T=0.1) and majority vote.

Pure functions on tensors; feature extraction lives in features.py, the multi-process
version (training set sharded over ranks) in sharded.py, which reuses the vote below. The
same code serves the monitor during pretraining and ``simclr knn``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

# (top_sim, top_lab) -> (top_sim, top_lab): combines a chunk's candidates before the vote
Merge = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def knn_vote(top_sim: torch.Tensor, top_lab: torch.Tensor, num_classes: int, temperature: float = 0.1,
             weighted: bool = True) -> torch.Tensor:
    """Class scores (n, C) from each row's neighbours. top_sim, top_lab: (n, k) cosine similarity
    and label of the k neighbours. weighted: each votes exp(sim / temperature) (Wu et al. 2018);
    else 1."""
    votes = (top_sim / temperature).exp() if weighted else torch.ones_like(top_sim)
    scores = torch.zeros(top_sim.shape[0], num_classes, device=top_sim.device)
    return scores.scatter_add_(1, top_lab, votes)


@torch.no_grad()
def knn_predict(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, k: int = 200,
                temperature: float = 0.1, weighted: bool = True, num_classes: int | None = None,
                chunk: int = 1024, merge: Optional[Merge] = None) -> torch.Tensor:
    """Class scores (n_test, C) from the k nearest training features by cosine similarity.

    train_f: (n_train, d), train_y: (n_train,), test_f: (n_test, d). ``merge`` sees each chunk's
    (n, k) candidates before the vote; the sharded kNN uses it to pick the global k nearest from
    every rank's candidates, so the vote exists once.
    """
    num_classes = num_classes or int(train_y.max()) + 1
    k = min(k, train_f.shape[0])
    train_f = F.normalize(train_f.float(), dim=1)
    test_f = F.normalize(test_f.float(), dim=1)
    out = []
    for i in range(0, test_f.shape[0], chunk):
        sim = test_f[i:i + chunk] @ train_f.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        top_lab = train_y[top_idx]
        if merge is not None:
            top_sim, top_lab = merge(top_sim, top_lab)
        out.append(knn_vote(top_sim, top_lab, num_classes, temperature, weighted))
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> dict:
    """Percent of rows whose label is among the top-k scores, for each k (capped at #classes)."""
    res = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        hit = (scores.topk(kk, dim=1).indices == y.unsqueeze(1)).any(dim=1).float().mean().item()
        res[f"top{k}"] = 100.0 * hit
    return res


def knn_classifier(train_f, train_y, test_f, test_y, k: int = 200, temperature: float = 0.1,
                   weighted: bool = True) -> dict:
    """Top-1/top-5 (percent) of kNN on the test features."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    scores = knn_predict(train_f, train_y, test_f, k, temperature, weighted, num_classes)
    return topk_accuracy(scores, test_y)


# A confusion matrix is written into eval.json up to this many classes (CIFAR-100: 10,000 counts); ImageNet's
# would be a million numbers, so it keeps per-class accuracy only.
MAX_CONFUSION_CLASSES = 100


def accuracy_report(scores: torch.Tensor, y: torch.Tensor, classes=None) -> dict:
    """The result block every protocol reports: top-1, top-5, per-class top-1 (percent) and, for up to
    MAX_CONFUSION_CLASSES classes, the confusion matrix (counts; row: true class, column: predicted).

    scores: (N, C) any monotone class scores (logits, probabilities, votes); y: (N,).
    """
    scores, y = scores.detach().float().cpu(), y.detach().long().cpu()
    res = topk_accuracy(scores, y)
    pred = scores.argmax(1)
    n_classes = scores.shape[1]
    names = list(classes) if classes is not None else [str(c) for c in range(n_classes)]
    per_class = {}
    for c in range(n_classes):
        mask = y == c
        if mask.any():
            per_class[names[c] if c < len(names) else str(c)] = 100.0 * (pred[mask] == c).float().mean().item()
    out = {"top1": res["top1"], "top5": res["top5"], "per_class": per_class, "n": int(y.numel())}
    if n_classes <= MAX_CONFUSION_CLASSES:
        cm = torch.zeros(n_classes, n_classes, dtype=torch.long)
        cm.index_put_((y, pred), torch.ones_like(y), accumulate=True)
        out["confusion"] = cm.tolist()
    return out
