"""Grad cache equals the one-shot batch (BN frozen). (foreach LARS = plain LARS:
tests/optim/test_lars_and_schedules.py.)"""
from __future__ import annotations

import copy

import pytest
import torch

from simclr.gradcache import chunk_rows, grad_cache_backward
from simclr.loss import nt_xent
from simclr.models import SimCLRModel


def _model(seed=0):
    torch.manual_seed(seed)
    return SimCLRModel("resnet18", cifar_stem=True, width=8, proj_dim=16)


def _one_shot_grads(model, x, t=0.5, m=2):
    model.zero_grad(set_to_none=True)
    loss, _ = nt_xent(model(x)["z"], t, m)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_chunk_rows_cover_every_view_of_each_image_once():
    rows = chunk_rows(6, 2, 3)
    assert [r.tolist() for r in rows] == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    with pytest.raises(Exception, match="must divide"):
        chunk_rows(6, 2, 4)


@pytest.mark.parametrize("chunks", [2, 4])
def test_grad_cache_equals_one_shot_with_frozen_bn(chunks):
    model = _model().double().eval()  # eval: BN uses running statistics, so chunking cannot change it
    x = torch.rand(2 * 8, 3, 16, 16, dtype=torch.float64)
    ref_loss, ref = _one_shot_grads(model, x)
    model.zero_grad(set_to_none=True)
    loss, _ = grad_cache_backward(model, x, 0.5, 2, chunks)
    assert abs(loss.item() - ref_loss.item()) < 1e-10
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys() and len(got) > 20
    for n, g in got.items():
        assert torch.allclose(g, ref[n], atol=1e-5, rtol=0), n


def test_grad_cache_float32_within_1e5():
    model = _model(1).eval()
    x = torch.rand(2 * 8, 3, 16, 16)
    _, ref = _one_shot_grads(model, x, t=0.2)
    model.zero_grad(set_to_none=True)
    grad_cache_backward(model, x, 0.2, 2, 4)
    worst = max((p.grad - ref[n]).abs().max().item() for n, p in model.named_parameters() if n in ref)
    assert worst < 1e-5


def test_grad_cache_train_mode_is_per_chunk_bn_and_updates_running_stats_once_per_chunk():
    model = _model(2).train()
    x = torch.rand(2 * 8, 3, 16, 16)
    # independent reference: one-shot loss on z assembled from per-chunk forwards (BN per chunk)
    ref_model = copy.deepcopy(model)
    rows = chunk_rows(8, 2, 2)
    parts = [ref_model(x[r])["z"] for r in rows]
    z = torch.zeros(16, 16).index_add(0, rows[0], parts[0]).index_add(0, rows[1], parts[1])
    nt_xent(z, 0.5, 2)[0].backward()
    grad_cache_backward(model, x, 0.5, 2, 2)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        assert p.grad is None or torch.allclose(p.grad, q.grad, atol=1e-5), n
    for (n, b), c in zip(model.named_buffers(), ref_model.buffers()):
        assert torch.allclose(b.float(), c.float(), atol=1e-6), n  # not updated twice by the graph-free pass
