"""The Python API's preprocessing: ``encoder.transform`` and a warning on an input of the wrong size."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF
from torchvision.transforms import InterpolationMode

from simclr.models import build_model
from simclr.weights import Encoder


def _encoder(size: int = 32) -> Encoder:
    torch.manual_seed(0)
    model = build_model(SimpleNamespace(arch="resnet18", width=8, proj_layers=2, proj_dim=16, timm_kwargs=""), size)
    return Encoder(model, size, "test")


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_an_image_at_the_encoder_size_passes_unchanged():
    img = _image(32, 32)
    x = _encoder().transform(img)
    expected = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    assert torch.allclose(x, expected)


def test_a_larger_image_is_resized_and_centre_cropped_as_the_evaluation_does():
    img = _image(224, 160)
    x = _encoder().transform(img)
    assert x.shape == (3, 32, 32)
    # by hand: the short side to 32 / 0.875 = 37 (bicubic), the central 32 x 32, values in [0, 1]
    ref = TF.center_crop(TF.resize(img, 37, interpolation=InterpolationMode.BICUBIC), [32, 32])
    expected = (torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255).clamp(0, 1)
    assert torch.allclose(x, expected, atol=1e-6)
    assert 0 <= x.min() and x.max() <= 1


def test_a_uint8_array_is_accepted():
    arr = np.asarray(_image(40, 40))
    assert _encoder().transform(arr).shape == (3, 32, 32)


def test_a_wrong_input_size_warns_once_and_names_the_fix():
    enc = _encoder()
    with pytest.warns(UserWarning, match=r"trained on 32x32 images but got 224x224.*encoder\.transform"):
        enc(torch.rand(1, 3, 224, 224))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc(torch.rand(1, 3, 224, 224))  # once, not on every batch
        _encoder()(torch.rand(2, 3, 32, 32))  # the right size: nothing


def test_the_transformed_image_goes_in_without_a_warning():
    enc = _encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = enc(enc.transform(_image(224, 224)).unsqueeze(0))
    assert h.shape == (1, enc.feat_dim)
