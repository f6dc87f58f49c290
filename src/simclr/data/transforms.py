"""The evaluation's transforms (no augmentation) and the constants of the augmentation's recipe.

The SimCLR augmentation itself, both its reference (PIL + torchvision) and its batched backend, is declared op
by op in :mod:`.augment`.
"""
from __future__ import annotations

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode



def blur_kernel_size(image_size: int) -> int:
    """10% of the image side, made odd (torchvision's blur needs an odd kernel)."""
    k = max(3, int(round(0.1 * image_size)))
    return k if k % 2 == 1 else k + 1


def use_blur(image_size: int, blur: str = "auto") -> bool:
    """The paper blurs ImageNet-size images only; CIFAR (32 px) is not blurred."""
    return blur == "on" or (blur == "auto" and image_size >= 64)


OFFICIAL_BLUR_SIGMA = (0.1, 2.0)  # the official SimCLR's and the paper's; the spec's code uses (0.2, 2.0)


class Clip:
    """Clamp to [0, 1] (blur and jitter can leave the range by rounding)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_(0.0, 1.0)

    def __repr__(self) -> str:
        return "Clip()"


def eval_transform(image_size: int, native: int) -> T.Compose:
    """No augmentation. Images already at the network's size pass through; larger ones are
    resized so the centre crop covers 87.5% of the short side (the ImageNet protocol)."""
    if native == image_size:
        return T.Compose([T.ToTensor()])
    return T.Compose([T.Resize(int(round(image_size / 0.875)), interpolation=InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), T.ToTensor(), Clip()])


class InputTransform:
    """What ``simclr eval`` feeds an encoder trained at ``image_size``, for one image of any size: a PIL image
    (or an (H, W, 3) uint8 array) -> float tensor (3, S, S) in [0, 1]. An image already S x S passes as is;
    another is resized and centre-cropped as :func:`eval_transform` does (the crop covers 87.5% of the short
    side). No mean/std normalisation: the encoders take values in [0, 1], as in the spec."""

    def __init__(self, image_size: int):
        self.image_size = int(image_size)
        self._as_is = eval_transform(self.image_size, self.image_size)
        self._resized = eval_transform(self.image_size, -1)

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image
        if not isinstance(image, Image.Image):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        same = image.size == (self.image_size, self.image_size)
        return (self._as_is if same else self._resized)(image)

    def __repr__(self) -> str:
        return f"InputTransform(image_size={self.image_size}, resize/centre-crop (87.5%), values in [0, 1])"
