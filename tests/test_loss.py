"""NT-Xent against a naive double loop written straight from the paper's definition."""
import math

import pytest
import torch

import simclr


def naive_nt_xent(z, temperature, m):
    """Mean over anchors i and their m-1 positives p of -log(exp(s_ip/T) / sum_{k != i} exp(s_ik/T))."""
    rows = z.shape[0]
    n = rows // m
    zn = [zi / zi.norm() for zi in z]
    total, count = 0.0, 0
    for i in range(rows):
        denom = sum(torch.exp(torch.dot(zn[i], zn[k]) / temperature) for k in range(rows) if k != i)
        for v in range(m):
            p = v * n + i % n
            if p == i:
                continue
            total = total - torch.log(torch.exp(torch.dot(zn[i], zn[p]) / temperature) / denom)
            count += 1
    return total / count


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_loss_matches_naive_loop(m, temperature):
    torch.manual_seed(m)
    z = torch.randn(m * 5, 7, dtype=torch.float64)
    ours = simclr.nt_xent_loss(z.float(), temperature, multiplier=m)
    ref = naive_nt_xent(z, temperature, m)
    assert abs(ours.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))


@pytest.mark.parametrize("m", [2, 3])
def test_gradient_matches_autograd_through_naive_loop(m):
    torch.manual_seed(10 + m)
    z0 = torch.randn(m * 4, 6, dtype=torch.float64)
    z1 = z0.clone().float().requires_grad_(True)
    simclr.nt_xent_loss(z1, 0.5, multiplier=m).backward()
    z2 = z0.clone().requires_grad_(True)
    naive_nt_xent(z2, 0.5, m).backward()
    assert torch.allclose(z1.grad.double(), z2.grad, atol=1e-6, rtol=1e-4)


def test_loss_value_for_identical_views_is_hand_computable():
    # N images with orthogonal projections, both views identical: s_ip = 1, s_ik = 0 for the
    # 2N-2 negatives, so loss = -log(e^(1/T) / (e^(1/T) + 2N-2)).
    n, t = 3, 0.5
    z = torch.eye(n).repeat(2, 1)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * n - 2))
    assert simclr.nt_xent_loss(z, t) .item() == pytest.approx(expected, rel=1e-6)
    _, acc = simclr.nt_xent(z, t)
    assert acc.item() == 1.0  # every anchor's most similar other row is its positive


def test_contrastive_accuracy_counts_retrievals():
    # view 2 of image 0 is made closest to image 1's views -> anchors mispredict
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    _, acc = simclr.nt_xent(z, 0.5)
    assert acc.item() == 1.0
    z_bad = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # views swapped
    _, acc_bad = simclr.nt_xent(z_bad, 0.5)
    assert acc_bad.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stable_under_autocast(dtype):
    torch.manual_seed(0)
    z = torch.randn(64, 128) * 50  # large projections: would overflow exp in half precision
    ref = simclr.nt_xent_loss(z, 0.1)
    with torch.autocast("cpu", dtype=dtype):
        out = simclr.nt_xent_loss(z.to(dtype), 0.1)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert abs(out.item() - ref.item()) < 0.05 * abs(ref.item())


def test_bad_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="multiplier"):
        simclr.nt_xent_loss(torch.randn(5, 4), 0.5, multiplier=2)
