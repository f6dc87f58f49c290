"""Apply a pretrained encoder: embed images and find nearest neighbours.

    python examples/apply_model.py logs/demo/<run-id>          # newest checkpoint of a run folder
    python examples/apply_model.py path/to/checkpoint.pt       # or any checkpoint load_encoder reads

This replaces the spec's apply_model notebook. It embeds a few hundred CIFAR-10 training
images (DATA_ROOT must point at the data), then, for some test images, prints their nearest
training images by cosine similarity of the representation h, and the accuracy of a 1-nearest-
neighbour classifier built from them.
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import simclr
from simclr.checkpoint import list_checkpoints
from simclr.data import get_dataset, maybe_subset
from simclr.evaluate import extract_features


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a run folder or a checkpoint file")
    ap.add_argument("--gallery", type=int, default=500, help="training images to search")
    ap.add_argument("--queries", type=int, default=100, help="test images to look up")
    args = ap.parse_args()

    path = Path(args.model)
    if path.is_dir():  # a run folder: take its newest checkpoint
        found = list_checkpoints(path)
        if not found:
            raise SystemExit(f"no checkpoint in {path}/checkpoints")
        path = found[0]
    encoder = simclr.load_encoder(path)  # nn.Module, eval mode: images in [0, 1] -> h
    print(f"loaded {encoder.arch} ({encoder.feat_dim}-d features, {encoder.input_size}px input) from {path}")

    # embed a single batch of images by hand: (N, 3, H, W) floats in [0, 1]
    x = torch.rand(4, 3, encoder.input_size, encoder.input_size)
    with torch.no_grad():
        h = encoder(x)
    print(f"4 random images -> features of shape {tuple(h.shape)}")

    # embed whole datasets with the helper used by the evaluations
    size = encoder.input_size
    train = maybe_subset(get_dataset("cifar10", "train", image_size=size), args.gallery, seed=0)
    test = maybe_subset(get_dataset("cifar10", "test", image_size=size), args.queries, seed=0)
    g_f, g_y = extract_features(encoder, train, size)
    q_f, q_y = extract_features(encoder, test, size)
    sim = F.normalize(q_f, dim=1) @ F.normalize(g_f, dim=1).T  # cosine similarity (queries, gallery)
    top = sim.topk(5, dim=1)

    for i in range(0, len(test), max(1, len(test) // 3)):  # a few queries spread over the classes
        names = [train.classes[int(g_y[j])] for j in top.indices[i]]
        print(f"test image {i} ({test.classes[int(q_y[i])]}): nearest training images {names}")
    acc = (g_y[top.indices[:, 0]] == q_y).float().mean().item() * 100
    print(f"1-nearest-neighbour accuracy on {len(test)} test images: {acc:.1f}% "
          f"(chance {100 / len(train.classes):.0f}%)")


if __name__ == "__main__":
    main()
