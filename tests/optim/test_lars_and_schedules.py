"""LARS against hand-computed updates; parameter groups; learning-rate schedules."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import simclr
from simclr.models import SimCLRModel
from simclr.optim import build_optimizer, lr_schedule, param_groups


def _norm(xs):
    return math.sqrt(sum(x * x for x in xs))


def test_one_lars_step_equals_hand_computation():
    w0 = [[1.0, -2.0], [0.5, 3.0]]          # a 2-d weight: decayed and adapted
    b0 = [0.3, -0.4]                         # a bias (1-d): neither decayed nor adapted
    gw = [[0.1, 0.2], [-0.3, 0.4]]
    gb = [0.05, -0.02]
    lr, wd, eta, mom = 0.7, 0.01, 1e-3, 0.9
    w = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    b = nn.Parameter(torch.tensor(b0, dtype=torch.float64))
    w.grad, b.grad = torch.tensor(gw, dtype=torch.float64), torch.tensor(gb, dtype=torch.float64)
    opt = simclr.LARS([w, b], lr=lr, momentum=mom, weight_decay=wd, trust_coefficient=eta)
    opt.step()

    flat_w = [x for r in w0 for x in r]
    g = [gi + wd * wi for gi, wi in zip([x for r in gw for x in r], flat_w)]
    trust = eta * _norm(flat_w) / _norm(g)
    expected_w = [wi - lr * trust * gi for wi, gi in zip(flat_w, g)]   # v0 = 0, so w - v1
    expected_b = [bi - lr * gi for bi, gi in zip(b0, gb)]                # no decay, no trust ratio
    assert w.detach().flatten().tolist() == pytest.approx(expected_w, rel=1e-12)
    assert b.detach().tolist() == pytest.approx(expected_b, rel=1e-12)

    # second step: the velocity carries lr*trust*g of the first (TF-style momentum)
    v1 = [lr * trust * gi for gi in g]
    w1 = list(expected_w)
    w.grad = torch.tensor(gw, dtype=torch.float64)
    opt.step()
    g2 = [gi + wd * wi for gi, wi in zip([x for r in gw for x in r], w1)]
    trust2 = eta * _norm(w1) / _norm(g2)
    expected_w2 = [wi - (mom * vi + lr * trust2 * gi) for wi, vi, gi in zip(w1, v1, g2)]
    assert w.detach().flatten().tolist() == pytest.approx(expected_w2, rel=1e-12)


def test_zero_norm_gives_trust_ratio_one():
    w = nn.Parameter(torch.zeros(2, 2))
    w.grad = torch.ones(2, 2)
    simclr.LARS([w], lr=0.1).step()
    assert torch.allclose(w.detach(), torch.full((2, 2), -0.1))


def test_foreach_lars_equals_plain_lars_over_steps():
    """The multi-tensor (foreach) LARS step equals the per-parameter one, conv + BN + linear, four steps on
    new inputs (the trust ratio and momentum carried over), through build_optimizer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    nets = [copy.deepcopy(net) for _ in range(2)]
    opts = [build_optimizer(n, "lars", 0.5, 1e-3, foreach=f) for n, f in zip(nets, (False, True))]
    for _ in range(4):
        x = torch.randn(8, 3, 8, 8)
        for n, o in zip(nets, opts):
            o.zero_grad()
            n(x).square().mean().backward()
            o.step()
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(next(nets[0].parameters()), next(net.parameters()))  # it did train


def test_default_groups_exclude_every_bn_including_downsample():
    model = SimCLRModel("resnet18", cifar_stem=True, width=8)
    decay, no_decay = param_groups(model, 1e-6)
    names = {id(p): n for n, p in model.named_parameters()}
    excluded = {names[id(p)] for p in no_decay["params"]}
    assert "convnet.layer2.0.downsample.1.weight" in excluded   # the BN of a residual shortcut
    assert "convnet.layer2.0.downsample.1.bias" in excluded
    assert "convnet.bn1.weight" in excluded and "projection.bn1.bias" in excluded
    assert all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and no_decay["exclude"] is True
    # the frozen bias of the head's last BN is not trained at all
    assert "projection.bn2.bias" not in excluded and "projection.bn2.weight" in excluded


def test_spec_rule_misses_downsample_bn():
    model = SimCLRModel("resnet18", cifar_stem=True, width=8)
    decay, no_decay = param_groups(model, 1e-6, rule="spec")
    names = {id(p): n for n, p in model.named_parameters()}
    adapted = {names[id(p)] for p in decay["params"]}
    assert "convnet.layer2.0.downsample.1.weight" in adapted      # the spec's name rule keeps it
    assert "convnet.bn1.weight" not in adapted


def test_warmup_anneal_schedule_values():
    lrs = lr_schedule(4.0, 1000, "warmup-anneal", warmup=0.1)
    assert lrs[0] == 0.0                                   # official warmup starts from 0
    assert lrs[50] == pytest.approx(4.0 * 50 / 100)        # linear ramp
    assert lrs[100] == pytest.approx(4.0)                  # end of warmup: the peak
    assert lrs[550] == pytest.approx(2.0)                  # half-way through the cosine
    assert lrs[999] == pytest.approx(4.0 * 0.5 * (1 + math.cos(math.pi * 899 / 900)))
    assert lrs[999] < 1e-4 and np.all(np.diff(lrs[100:]) <= 0)


def test_linear_and_const_schedules():
    lin = lr_schedule(0.1, 100, "linear")
    assert lin[0] == pytest.approx(0.1) and lin[50] == pytest.approx(0.05) and lin[99] == pytest.approx(0.001)
    assert np.all(lr_schedule(0.3, 10, "const") == 0.3)


@pytest.mark.parametrize("mode,peak", [("none", 0.3), ("linear", 0.3 * 512 / 256), ("sqrt", 0.3 * math.sqrt(512))])
def test_lr_scaling_sets_the_peak_of_the_schedule_a_run_trains_with(mode, peak):
    """--lr_scaling as the official learning_rate_scaling: the schedule built for a run peaks at the scaled lr."""
    from simclr import config as config_lib
    from simclr.data.datasets import ArrayImages
    from simclr.options import PretrainConfig
    from simclr.train import build
    images = ArrayImages(np.zeros((600, 32, 32, 3), np.uint8), [i % 2 for i in range(600)], ["a", "b"], "x", 32)
    cfg = config_lib.build(PretrainConfig, dict(arch="resnet18", width=8, batch_size=512, lr=0.3, iters=100,
                                                warmup=0.1, lr_scaling=mode, workers=0, device="cpu"))
    parts = build(cfg, images, torch.device("cpu"))
    assert parts.lrs.max() == pytest.approx(peak) and parts.lrs[10] == pytest.approx(peak)
