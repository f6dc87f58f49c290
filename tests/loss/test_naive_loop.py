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


# --------------------------------------------------------------------------------------------
# DCL (decoupled contrastive loss): the positives out of the denominator
# --------------------------------------------------------------------------------------------
def naive_dcl(z, temperature, m, anchors=None):
    """Mean over anchors i (default: all rows) and their m-1 positives p of
    -log(exp(s_ip/T) / sum_{k not a view of i's image} exp(s_ik/T)), z ordered [view 1; view 2; ...]."""
    rows = z.shape[0]
    n = rows // m
    zn = [zi / zi.norm() for zi in z]
    total, count = 0.0, 0
    for i in (range(rows) if anchors is None else anchors):
        views_of_i = {v * n + i % n for v in range(m)}  # i itself and its positives
        denom = sum(torch.exp(torch.dot(zn[i], zn[k]) / temperature) for k in range(rows) if k not in views_of_i)
        for p in sorted(views_of_i - {i}):
            total = total - torch.log(torch.exp(torch.dot(zn[i], zn[p]) / temperature) / denom)
            count += 1
    return total / count


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_dcl_matches_naive_loop(m, temperature):
    from simclr.loss import dcl
    torch.manual_seed(20 + m)
    z = torch.randn(m * 5, 7, dtype=torch.float64)
    ours, _ = dcl(z.float(), temperature, multiplier=m)
    ref = naive_dcl(z, temperature, m)
    assert abs(ours.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    # not NT-Xent: the positive left in the denominator gives a larger loss
    assert simclr.nt_xent_loss(z.float(), temperature, m).item() > ours.item() + 1e-3


@pytest.mark.parametrize("m", [2, 3])
def test_dcl_gradient_matches_autograd_through_naive_loop(m):
    from simclr.loss import dcl
    torch.manual_seed(30 + m)
    z0 = torch.randn(m * 4, 6, dtype=torch.float64)
    z1 = z0.clone().float().requires_grad_(True)
    dcl(z1, 0.5, multiplier=m)[0].backward()
    z2 = z0.clone().requires_grad_(True)
    naive_dcl(z2, 0.5, m).backward()
    assert torch.allclose(z1.grad.double(), z2.grad, atol=1e-6, rtol=1e-4)


def test_dcl_value_for_identical_views_is_hand_computable():
    # N orthogonal images, both views identical: s_ip = 1, s_ik = 0 for the 2N-2 negatives, and the positive is
    # not in the denominator: loss = -1/T + log(2N-2)
    from simclr.loss import dcl
    n, t = 3, 0.5
    loss, acc = dcl(torch.eye(n).repeat(2, 1), t)
    assert loss.item() == pytest.approx(-1 / t + math.log(2 * n - 2), rel=1e-6)
    assert acc.item() == 1.0
    with pytest.raises(ValueError, match="2 images"):  # one image: no negatives at all
        dcl(torch.randn(2, 4), t)


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("rank", [0, 2])
def test_dcl_as_one_rank_of_a_group_matches_naive_loop_on_the_global_batch(monkeypatch, m, rank):
    """As tests/loss/test_index_arithmetic.py simulates a process group: the all-gather replaced by fixed projections of
    the other ranks. The reference is the naive loop on the global batch, over this rank's anchors."""
    from simclr import loss as loss_mod
    world, n, d, t = 3, 2, 5, 0.5
    torch.manual_seed(40 + m)
    local = [torch.randn(m * n, d, dtype=torch.float64) for _ in range(world)]  # each rank's rows [view 1; ...]

    def fake_all_gather(z):  # this rank's rows carry the gradient, the others are constants
        return [z if r == rank else torch.nn.functional.normalize(local[r].float(), dim=1) for r in range(world)]

    monkeypatch.setattr(loss_mod, "_world", lambda: (world, rank))
    monkeypatch.setattr(torch.distributed.nn.functional, "all_gather", fake_all_gather)
    z = local[rank].clone().float().requires_grad_(True)
    loss, _ = loss_mod.dcl(z, t, m)
    loss.backward()
    # the global batch [view 1 of all world*n images in rank order; view 2; ...], this rank's anchors in it
    glob = torch.cat([torch.cat([local[r][v * n:(v + 1) * n] for r in range(world)]) for v in range(m)])
    glob.requires_grad_(True)
    mine = [v * world * n + rank * n + i for v in range(m) for i in range(n)]
    ref = naive_dcl(glob, t, m, anchors=mine)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    torch.testing.assert_close(z.grad.double(), glob.grad[mine], atol=1e-6, rtol=1e-4)


def test_dcl_mean_over_simulated_ranks_is_the_global_loss(monkeypatch):
    from simclr import loss as loss_mod
    world, n, d, m, t = 2, 3, 4, 3, 0.2
    torch.manual_seed(50)
    local = [torch.randn(m * n, d) for _ in range(world)]
    monkeypatch.setattr(torch.distributed.nn.functional, "all_gather",
                        lambda z: [torch.nn.functional.normalize(x, dim=1) for x in local])
    losses = []
    for rank in range(world):
        monkeypatch.setattr(loss_mod, "_world", lambda r=rank: (world, r))
        losses.append(loss_mod.dcl(local[rank], t, m)[0].item())
    glob = torch.cat([torch.cat([local[r][v * n:(v + 1) * n] for r in range(world)]) for v in range(m)]).double()
    assert sum(losses) / world == pytest.approx(naive_dcl(glob, t, m).item(), abs=1e-5)


def test_criterion_seam_builds_the_configured_loss():
    """``build_criterion(cfg)(z, step)``: --loss picks the function, with the config's temperature and views."""
    from simclr.loss import build_criterion
    from simclr.options import PretrainConfig
    torch.manual_seed(60)
    z = torch.randn(3 * 4, 6, dtype=torch.float64)
    dcl_loss, _ = build_criterion(PretrainConfig(loss="dcl", temperature=0.3, multiplier=3))(z.float(), 7)
    assert dcl_loss.item() == pytest.approx(naive_dcl(z, 0.3, 3).item(), rel=1e-5)
    default, _ = build_criterion(PretrainConfig(temperature=0.3, multiplier=3))(z.float(), 7)
    assert default.item() == pytest.approx(naive_nt_xent(z, 0.3, 3).item(), rel=1e-5)
