"""NT-Xent by index arithmetic against the implementation it replaced (boolean masks and a one-hot matrix).

The old function is copied here verbatim as the reference: same loss, accuracy and gradient to 1e-6, for
m = 2, 3, 4 views, in one process and as rank r of a simulated process group (the all-gather replaced by
fixed other ranks' projections, so the rank offsets of the self column and the positives are exercised).
"""
import pytest
import torch
import torch.nn.functional as F

from simclr import loss as loss_mod


def old_nt_xent(z, temperature, multiplier=2):
    """The NT-Xent of the previous release (self column by a one-hot mask, positives by a boolean index)."""
    m = multiplier
    n = z.shape[0] // m
    world, rank = loss_mod._world()
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=1)
        if world > 1:
            from torch.distributed.nn.functional import all_gather
            parts = all_gather(z)
            cols = torch.cat([p.view(m, n, -1) for p in parts], dim=1).reshape(m * world * n, -1)
        else:
            cols = z
        big_n = world * n
        view = torch.arange(m, device=z.device).repeat_interleave(n)
        image = rank * n + torch.arange(n, device=z.device).repeat(m)
        self_col = view * big_n + image
        logits = (z @ cols.t()) / temperature
        logits = logits.masked_fill(F.one_hot(self_col, m * big_n).bool(), float("-inf"))
        logprob = F.log_softmax(logits, dim=1)
        others = torch.arange(m, device=z.device).unsqueeze(0).expand(m * n, m)
        others = others[others != view.unsqueeze(1)].view(m * n, m - 1)
        pos_cols = others * big_n + image.unsqueeze(1)
        loss = -logprob.gather(1, pos_cols).mean()
        with torch.no_grad():
            top = logits.topk(m - 1, dim=1).indices.sort(dim=1).values
            acc = (top == pos_cols.sort(dim=1).values).all(dim=1).float().mean()
    return loss, acc


def _both(fn, z0, t, m):
    z = z0.clone().requires_grad_(True)
    loss, acc = fn(z, t, m)
    loss.backward()
    return loss.detach(), acc, z.grad


@pytest.mark.parametrize("m", [2, 3, 4])
def test_same_loss_accuracy_and_gradient_as_the_old_implementation(m):
    torch.manual_seed(m)
    z0 = torch.randn(m * 6, 8)
    z0[m * 6 // 2:] = z0[:m * 6 // 2] + 0.3 * torch.randn(m * 3, 8)  # some anchors retrieve their positives
    new, old = _both(loss_mod.nt_xent, z0, 0.2, m), _both(old_nt_xent, z0, 0.2, m)
    assert abs(new[0].item() - old[0].item()) < 1e-6
    assert new[1].item() == old[1].item()
    assert torch.allclose(new[2], old[2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("rank", [0, 2])
def test_same_as_the_old_implementation_as_one_rank_of_a_group(monkeypatch, m, rank):
    world, n, d = 3, 4, 5
    torch.manual_seed(100 + m)
    peers = [torch.nn.functional.normalize(torch.randn(m * n, d), dim=1) for _ in range(world)]

    def fake_all_gather(z):  # this rank's rows carry the gradient, the others are constants
        return [z if r == rank else peers[r] for r in range(world)]

    monkeypatch.setattr(loss_mod, "_world", lambda: (world, rank))
    monkeypatch.setattr(torch.distributed.nn.functional, "all_gather", fake_all_gather)
    z0 = torch.randn(m * n, d)
    new, old = _both(loss_mod.nt_xent, z0, 0.5, m), _both(old_nt_xent, z0, 0.5, m)
    assert abs(new[0].item() - old[0].item()) < 1e-6
    assert new[1].item() == old[1].item()
    assert torch.allclose(new[2], old[2], atol=1e-6, rtol=0)
