"""Datasets, reference transforms and batch sources (see loaders.py for the interface)."""
from .datasets import (LabeledImages, balanced_indices, check_same_classes, data_folder, get_dataset, maybe_subset,
                       native_size)
from .loaders import ReferenceLoader, views_first
from .sampler import StepBatches
from .augment import AugSpec, simclr_transform
from .transforms import eval_transform

__all__ = ["LabeledImages", "balanced_indices", "check_same_classes", "data_folder", "get_dataset", "maybe_subset",
           "native_size", "ReferenceLoader", "StepBatches", "views_first", "eval_transform", "simclr_transform",
           "AugSpec"]
