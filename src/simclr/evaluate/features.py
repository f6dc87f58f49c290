"""Extract frozen features of a dataset with an encoder (batched, no augmentation)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import LabeledImages
from ..data.transforms import eval_transform


class _EvalDataset(Dataset):
    def __init__(self, images: LabeledImages, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images.load(i)), self.images.targets[i]


def image_batches(images: LabeledImages, image_size: int, batch_size: int = 512, workers: int = 0,
                  device: torch.device = torch.device("cpu")):
    """Yield (x, y) over the dataset in order, x float (B, 3, S, S) in [0, 1] on ``device``.

    Small datasets held as arrays at the network's size skip PIL entirely.
    """
    arr = getattr(images, "images", None)
    if arr is not None and arr.shape[1] == image_size:
        y_all = torch.as_tensor(np.asarray(images.targets))
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(arr[i:i + batch_size])).to(device)
            yield x.permute(0, 3, 1, 2).float().div_(255), y_all[i:i + batch_size].to(device)
        return
    native = arr.shape[1] if arr is not None else -1
    loader = DataLoader(_EvalDataset(images, eval_transform(image_size, native)), batch_size=batch_size,
                        num_workers=workers, pin_memory=device.type == "cuda")
    for x, y in loader:
        yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device)


@torch.no_grad()
def extract_features(encode, images: LabeledImages, image_size: int, batch_size: int = 512, workers: int = 0,
                     device: torch.device = torch.device("cpu"), autocast_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """encode: callable (B, 3, S, S) -> (B, d). Returns (features (N, d) fp32, labels (N,)) on ``device``."""
    feats, labels = [], []
    for x, y in image_batches(images, image_size, batch_size, workers, device):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            f = encode(x)
        feats.append(f.float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)
