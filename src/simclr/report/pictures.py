"""The report's pictures that need the images and the encoder: augmented views, retrieval, embedding.

    views.png       augmented views from the run's own augmentation settings
    retrieval.png   test queries and their nearest training images (by h, the representation)
    embedding.png   2-D PCA of test-image representations, coloured by class

The images are read from the dataset root given to :class:`Datasets` (the report passes where the run
read them); nothing here changes the process environment.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from .plots import figure, save

log = logging.getLogger(__name__)


def _to_hwc(x) -> np.ndarray:
    return x.permute(1, 2, 0).clamp(0, 1).numpy()


def _display_transform(ds, size: int):
    from ..data.transforms import eval_transform
    arr = getattr(ds, "images", None)
    return eval_transform(size, arr.shape[1] if arr is not None else -1)


class Datasets:
    """get_dataset with a memo for one report: decoding CIFAR's 50,000 images takes seconds, once is enough.

    ``root``: the folder holding the datasets (None: ``DATA_ROOT``, as everywhere else)."""

    def __init__(self, cfg: dict, root: Optional[str] = None):
        self.data = str(cfg.get("data", "cifar10"))
        self.path = str(cfg.get("data_path", "") or "")
        self.root = Path(root) if root else None
        self._memo: dict = {}

    def __call__(self, split: str, size: int):
        from ..data import get_dataset, native_size
        if split == "pretrain" and self.data != "stl10":  # the same images as the labelled train split
            split = "train"
        size = native_size(self.data, size)
        key = (split, size)
        if key not in self._memo:
            self._memo[key] = get_dataset(self.data, split, self.path, size, root=self.root)
        return self._memo[key]


def plot_views(cfg: dict, path: Path, n_images: int = 6, n_views: int = 6, seed: int = 0,
               datasets: Optional[Datasets] = None) -> tuple:
    """Rows: one training image, then ``n_views`` views drawn by the run's augmentation
    (:class:`simclr.data.augment.AugSpec` from its config: image size, colour strength, crop scale
    and blur), i.e. what the network is trained on. Returns (path, caption)."""
    import torch
    from ..data import maybe_subset
    from ..data.augment import AugSpec
    datasets = datasets or Datasets(cfg)
    data = datasets.data
    size = int(cfg.get("image_size", 0) or 0)
    # labelled images (for STL-10 the unlabeled part would do as well, but its loading is slow)
    pick = maybe_subset(datasets("train", size), n_images, seed=seed)
    size = pick.image_size
    aug = bool(cfg.get("aug", True))
    tf = AugSpec.from_config(cfg, size).reference()  # the run's own recipe, --blur_sigma included
    show = _display_transform(pick, size)
    fig, ax = figure(1.25 * (n_views + 1), 1.3 * len(pick) + 0.4, len(pick), n_views + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(len(pick)):
            img = pick.load(i)
            ax[i, 0].imshow(_to_hwc(show(img)), interpolation="nearest")
            for j in range(n_views):
                ax[i, j + 1].imshow(_to_hwc(tf(img) if aug else show(img)), interpolation="nearest")
    for a in ax.ravel():
        a.set_xticks([])
        a.set_yticks([])
    ax[0, 0].set_title("image", fontsize=9)
    for j in range(n_views):
        ax[0, j + 1].set_title(f"view {j + 1}", fontsize=9)
    save(fig, path)
    caption = (f"{len(pick)} training images of {data} and {n_views} augmented views each, drawn with this run's "
               f"settings: {AugSpec.from_config(cfg, size).describe()}.")
    if not aug:
        caption += " This run has aug: false, so every view is the plain image."
    return path, caption


def load_run_encoder(run: Path, cfg: dict):
    """The encoder of the run's newest loadable checkpoint (or, for an eval run, its encoder_ckpt). Each file is
    pinned while it is read, as every reader does (:func:`simclr.checkpoint.pin`): a run still training does not
    prune it under the reader, and one pruned since it was listed is passed over in silence, not called corrupt."""
    from ..checkpoint import list_checkpoints, pin, unpin
    from ..errors import CheckpointError
    from ..weights import load_encoder
    candidates = list(list_checkpoints(run))
    enc = cfg.get("encoder_ckpt")
    if isinstance(enc, str) and enc:  # an eval run: its checkpoints are heads, the encoder lies elsewhere
        candidates.insert(0, Path(enc))
    for p in candidates:
        if not pin(p):
            continue  # pruned since it was listed: the next one
        try:
            return load_encoder(p), p
        except CheckpointError as e:
            log.info(f"note: skipping {p}: {e}")
        finally:
            unpin(p)
    return None, None


def _features(encoder, ds, size: int, device):
    import torch
    from ..evaluate import extract_features
    with torch.no_grad():
        f, y = extract_features(encoder, ds, size, 256, 0, device)
    return torch.nn.functional.normalize(f.float(), dim=1).cpu(), y.cpu()


MAX_QUERIES = 100  # rows of the retrieval grid when every class is asked for (ImageNet has 1,000 classes)


def plot_retrieval_and_embedding(encoder, cfg: dict, out_dir: Path, n_queries: int = 0, k: int = 8,
                                 gallery: int = 1000, n_embed: int = 500, device: str = "cpu",
                                 datasets: Optional[Datasets] = None) -> dict:
    """Nearest-neighbour retrieval grid and 2-D PCA embedding from the learned representation h.

    Gallery: a class-balanced subset of the labelled training split; queries and the embedding:
    class-balanced subsets of the test split. Similarity: cosine of h (as the kNN monitor).
    Returns {"retrieval": (path, caption), "embedding": (path, caption)}.
    """
    import torch
    from ..data import maybe_subset
    dev = torch.device(device)
    encoder = encoder.to(dev).eval()
    datasets = datasets or Datasets(cfg)
    size = int(cfg.get("image_size", 0) or 0) or encoder.input_size
    train = maybe_subset(datasets("train", size), gallery, seed=0)
    test = maybe_subset(datasets("test", size), n_embed, seed=1)
    size = train.image_size
    g_f, g_y = _features(encoder, train, size, dev)
    t_f, t_y = _features(encoder, test, size, dev)
    classes = list(train.classes)
    out = {}

    # retrieval: one query per class (every class, or the first n_queries), taken from the embedded test subset
    n_queries = n_queries or min(len(classes), MAX_QUERIES)
    q_idx = []
    for c in range(len(classes)):
        hit = (t_y == c).nonzero().flatten()
        if len(hit):
            q_idx.append(int(hit[0]))
        if len(q_idx) == n_queries:
            break
    sims = t_f[q_idx] @ g_f.T
    top = sims.topk(min(k, len(train)), dim=1)
    show_tr, show_te = _display_transform(train, size), _display_transform(test, size)
    kk = top.indices.shape[1]
    fig, ax = figure(1.15 * (kk + 1) + 0.3, 1.3 * len(q_idx) + 0.5, len(q_idx), kk + 1)
    same = 0
    for r, qi in enumerate(q_idx):
        qy = int(t_y[qi])
        ax[r, 0].imshow(_to_hwc(show_te(test.load(qi))), interpolation="nearest")
        ax[r, 0].set_title(f"query: {classes[qy]}", fontsize=8, color="navy")
        for j in range(kk):
            gi = int(top.indices[r, j])
            ok = int(g_y[gi]) == qy
            same += ok
            a = ax[r, j + 1]
            a.imshow(_to_hwc(show_tr(train.load(gi))), interpolation="nearest")
            a.set_title(f"{classes[int(g_y[gi])]} {float(top.values[r, j]):.2f}", fontsize=7,
                        color="green" if ok else "red")
            for sp in a.spines.values():
                sp.set_edgecolor("green" if ok else "red")
                sp.set_linewidth(2.5)
    for a in ax.ravel():
        a.set_xticks([])
        a.set_yticks([])
    p = save(fig, out_dir / "retrieval.png")
    frac = 100.0 * same / max(1, len(q_idx) * kk)
    out["retrieval"] = (p, f"Left: a test image; right: its {kk} nearest of {len(train)} training images by cosine "
                           f"similarity of h (value above each). Green: same class as the query, red: another "
                           f"class; {frac:.0f}% of neighbours share the query's class "
                           f"(chance {100.0 / max(1, len(classes)):.0f}%). Queries: one per class, "
                           f"{len(q_idx)} of {len(classes)} classes.")

    # embedding: PCA to 2-D (a linear map: distances are not distorted the way t-SNE's are)
    x = t_f - t_f.mean(0, keepdim=True)
    _, sv, v = torch.linalg.svd(x, full_matrices=False)
    xy = (x @ v[:2].T).numpy()
    var = (sv[:2] ** 2 / (sv ** 2).sum()).numpy() * 100
    fig, ax = figure(6.4, 5.0)
    a = ax[0, 0]
    cmap = "tab10" if len(classes) <= 10 else "tab20"
    import matplotlib
    colors = matplotlib.colormaps[cmap]
    ty = t_y.numpy()
    for c in range(len(classes)):
        m = ty == c
        if m.any():
            a.scatter(xy[m, 0], xy[m, 1], s=7, alpha=0.7, color=colors(c % colors.N), label=classes[c])
    a.set(xlabel=f"PC 1 ({var[0]:.0f}% of variance)", ylabel=f"PC 2 ({var[1]:.0f}%)",
          title=f"h of {len(test)} test images, PCA")
    if len(classes) <= 20:
        a.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    p = save(fig, out_dir / "embedding.png")
    out["embedding"] = (p, f"The representation h of {len(test)} test images projected on its first two principal "
                           f"components, coloured by the true class; the classes are never seen in pretraining.")
    return out

