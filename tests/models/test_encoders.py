"""Encoders, projection head and the official initialisation."""
import math

import pytest
import torch
import torchvision

from simclr.models import ProjectionHead, ResNet, SimCLRModel


def test_resnet50_cifar_stem_shapes_and_dims():
    m = SimCLRModel("resnet50", cifar_stem=True)
    assert m.convnet.conv1.kernel_size == (3, 3) and m.convnet.conv1.stride == (1, 1)
    assert isinstance(m.convnet.maxpool, torch.nn.Identity)
    m.eval()
    out = m(torch.rand(2, 3, 32, 32))
    assert out["h"].shape == (2, 2048) and out["z"].shape == (2, 128)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_parameter_names_match_torchvision(arch):
    ours = ResNet(arch, cifar_stem=False)
    tv = getattr(torchvision.models, arch)()
    tv_sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in tv_sd.items()}
    # and the same computation: load ours into torchvision, compare pooled features
    tv.load_state_dict(dict(ours.state_dict(), **{"fc.weight": tv.fc.weight, "fc.bias": tv.fc.bias}))
    tv.fc = torch.nn.Identity()
    ours.eval(), tv.eval()
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(ours(x), tv(x), atol=1e-5)


def test_head_layout_is_the_specs():
    head = ProjectionHead(16, 128, layers=2)
    keys = set(head.state_dict())
    assert {"fc1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "fc2.weight", "bn2.weight", "bn2.bias",
            "bn2.running_var", "bn2.num_batches_tracked"} <= keys
    assert head.fc1.bias is None and head.fc2.bias is None
    assert head.fc2.weight.shape == (128, 16)
    assert not head.bn2.bias.requires_grad and torch.all(head.bn2.bias == 0)
    # v2 head: three fc layers, g1 is the first block's output (after ReLU)
    head3 = ProjectionHead(16, 8, layers=3)
    head3.train()
    h = torch.randn(10, 16)
    g1 = head3(h, upto=1)
    assert g1.shape == (10, 16) and (g1 >= 0).all()
    assert head3(h).shape == (10, 8)


def test_official_init_reaches_every_module():
    torch.manual_seed(0)
    m = SimCLRModel("resnet50", cifar_stem=True)
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            w = mod.weight.detach()
            fan_in = w.shape[1] * w.shape[2] * w.shape[3]
            std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
            assert w.abs().max() <= 2 * std + 1e-7, name          # truncated at 2 std
            if w.numel() > 2000:
                # truncated normal on [-2s, 2s] has std 0.8796 s = sqrt(1/fan_in)
                assert w.std().item() == pytest.approx(math.sqrt(1.0 / fan_in), rel=0.1), name
        elif isinstance(mod, torch.nn.Linear):
            assert mod.weight.std().item() == pytest.approx(0.01, rel=0.05), name
    # torchvision's default (kaiming, fan_out) would give a very different std for the stem conv
    assert m.convnet.conv1.weight.std().item() == pytest.approx(math.sqrt(1 / 27), rel=0.25)


def test_encode_layers():
    m = SimCLRModel("resnet18", cifar_stem=True, width=8, proj_layers=3).eval()
    x = torch.rand(3, 3, 32, 32)
    assert m.encode(x, "h").shape == (3, 64)
    assert m.encode(x, "g1").shape == (3, 64)
    assert torch.allclose(m.encode(x, "z"), m(x)["z"])
    with pytest.raises(ValueError):
        m.encode(x, "q")
