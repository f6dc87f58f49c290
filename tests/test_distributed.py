"""Data-parallel training with real processes (gloo on CPU), checked against one process.

The reference for every multi-process result is the same computation in a single process
on the whole global batch (plain BatchNorm, no process group), an independent code path.
"""
from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simclr import distributed
from simclr.config import PretrainConfig
from simclr.data.datasets import ArrayImages
from simclr.errors import UserError
from simclr.evaluate import extract_features, knn_classifier
from simclr.loss import nt_xent
from simclr.models import build_model

from conftest import run_cli, tiny_args

WORLD = 2
B = 8  # global images per step in the contract tests
D = 16  # projection dim


def _global_batch(m: int) -> torch.Tensor:
    """(m*B, 3, 32, 32) ordered [view 1 of the B images; view 2; ...]."""
    return torch.rand(m * B, 3, 32, 32, generator=torch.Generator().manual_seed(100 + m))


def _local_rows(t: torch.Tensor, m: int, rank: int, world: int) -> torch.Tensor:
    """This rank's images of every view: the layout each process feeds the model and the loss."""
    n = t.shape[0] // m
    return t.view(m, n, *t.shape[1:])[:, rank * n // world:(rank + 1) * n // world].reshape(-1, *t.shape[1:])


def _model(sync: bool, dtype=torch.float32):
    torch.manual_seed(0)
    model = build_model(PretrainConfig(arch="resnet18", width=8, proj_dim=D), 32).to(dtype)
    return distributed.convert_sync_batchnorm(model, torch.device("cpu")) if sync else model


def _knn_sets():
    rng = np.random.default_rng(3)
    # sizes not divisible by the world size, so the shards differ in length
    tr = ArrayImages(rng.integers(0, 256, (37, 32, 32, 3), dtype=np.uint8), rng.integers(0, 4, 37).tolist(),
                     list("abcd"), "rand", 32)
    te = ArrayImages(rng.integers(0, 256, (21, 32, 32, 3), dtype=np.uint8), rng.integers(0, 4, 21).tolist(),
                     list("abcd"), "rand", 32)
    return tr, te


def _encoder():
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, stride=4), torch.nn.Flatten()).eval()


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    res = {}
    for m, dtype in [(2, torch.float32), (3, torch.float32), (2, torch.float64), (3, torch.float64)]:
        # the model path: SyncBN (our CPU GlobalBatchNorm) + DDP, each rank its own images
        model = _model(sync=True, dtype=dtype)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        loss, acc = nt_xent(ddp(_local_rows(_global_batch(m).to(dtype), m, rank, world))["z"], 0.5, m)
        loss.backward()
        res[f"model{m}{dtype}"] = {"loss": distributed.all_reduce_mean(loss.detach()).item(),
                                   "acc": distributed.all_reduce_mean(acc).item(),
                                   "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
                                   "buffers": {k: b.clone() for k, b in model.named_buffers()}}
    for m in (2, 3):
        # the loss contract on fixed projections (what DDP without SyncBN relies on)
        z_all = torch.randn(m * B, D, generator=torch.Generator().manual_seed(7 + m))
        z = _local_rows(z_all, m, rank, world).clone().requires_grad_(True)
        zl, za = nt_xent(z, 0.5, m)
        zl.backward()
        res[f"z{m}"] = {"loss": zl.item(), "acc": za.item(), "grad": z.grad.clone()}
    tr, te = _knn_sets()
    res["knn"] = distributed.sharded_knn(_encoder(), tr, te, 32, torch.device("cpu"), None, k=10, temperature=0.1)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results():
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(WORLD, os.path.join(tmp, "store"), tmp), nprocs=WORLD, join=True,
                           start_method="spawn")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [2, 3])
def test_syncbn_ddp_grads_equal_single_process(two_rank_results, m, dtype):
    ref = _model(sync=False, dtype=dtype)  # plain BatchNorm, one process, the whole global batch
    loss, acc = nt_xent(ref(_global_batch(m).to(dtype))["z"], 0.5, m)
    loss.backward()
    ref_grads = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    for r, res in enumerate(two_rank_results):
        got = res[f"model{m}{dtype}"]
        assert got["loss"] == pytest.approx(loss.item(), abs=1e-5)
        assert got["acc"] == pytest.approx(acc.item(), abs=1e-6)
        assert set(got["grads"]) == set(ref_grads)
        for k, g in ref_grads.items():
            diff = (got["grads"][k] - g).abs().max().item()
            if dtype == torch.float64:  # the loss itself runs in fp32, the network in fp64: exact to 1e-5
                assert diff <= 1e-5, f"rank {r} grad {k}: max |diff| {diff:.2e}"
            else:  # fp32: a different summation order over 18 layers leaves ~1e-6 relative roundoff
                assert diff <= 1e-5 * max(1.0, g.abs().max().item()) * 3, f"rank {r} grad {k}: {diff:.2e}"
        # BN running statistics were updated with the global batch's statistics
        for k, b in ref.named_buffers():
            torch.testing.assert_close(got["buffers"][k], b, atol=1e-5, rtol=1e-5, msg=f"rank {r} buffer {k}")


@pytest.mark.parametrize("m", [2, 3])
def test_nt_xent_contract_on_fixed_z(two_rank_results, m):
    z_all = torch.randn(m * B, D, generator=torch.Generator().manual_seed(7 + m)).requires_grad_(True)
    loss, acc = nt_xent(z_all, 0.5, m)
    loss.backward()
    losses = [res[f"z{m}"]["loss"] for res in two_rank_results]
    assert np.mean(losses) == pytest.approx(loss.item(), abs=1e-6)
    assert np.mean([res[f"z{m}"]["acc"] for res in two_rank_results]) == pytest.approx(acc.item(), abs=1e-6)
    for r, res in enumerate(two_rank_results):
        # mean over ranks of the gradient = the single-process gradient's rows of this rank; since the
        # all-gather's backward sums every rank's contribution, z.grad is W times those rows
        want = _local_rows(z_all.grad, m, r, WORLD)
        torch.testing.assert_close(res[f"z{m}"]["grad"] / WORLD, want, atol=1e-6, rtol=1e-5)
    assert losses[0] != pytest.approx(losses[1])  # each rank scores its own rows


def test_sharded_knn_equals_single_process(two_rank_results):
    tr, te = _knn_sets()
    enc = _encoder()
    tr_f, tr_y = extract_features(enc, tr, 32)
    te_f, te_y = extract_features(enc, te, 32)
    ref = knn_classifier(tr_f, tr_y, te_f, te_y, k=10, temperature=0.1)
    for res in two_rank_results:
        assert res["knn"]["knn_top1"] == pytest.approx(ref["top1"])
        assert res["knn"]["knn_top5"] == pytest.approx(ref["top5"])


# --------------------------------------------------------------------------------------------
# launch arithmetic: clear errors before any process-group work
# --------------------------------------------------------------------------------------------
def _cfg(**kw) -> PretrainConfig:
    return PretrainConfig(device="cpu", batch_size=32, **kw)


def test_indivisible_batch_is_refused_before_spawning(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(UserError, match=r"batch_size 33 is not divisible by the number of processes 2"):
        distributed.maybe_spawn(PretrainConfig(device="cpu", batch_size=33, dist="ddp", world_size=2), [])
    monkeypatch.setenv(distributed.PROCS_ENV, "3")  # 2 nodes x 3 processes
    with pytest.raises(UserError, match=r"batch_size 32 is not divisible by the number of processes 6"):
        distributed.maybe_spawn(_cfg(dist="ddp", world_size=2), [])
    # under torchrun the environment gives the world size
    monkeypatch.delenv(distributed.PROCS_ENV)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match=r"batch_size 32 is not divisible by the number of processes 3"):
        distributed.maybe_spawn(_cfg(), [])


def test_launch_form_errors_and_single_node_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(UserError, match="--node_rank 2 must be below --world_size 2"):
        distributed.maybe_spawn(_cfg(dist="ddp", world_size=2, node_rank=2), [])
    with pytest.raises(UserError, match="<address>:<port>"):
        distributed.maybe_spawn(_cfg(dist="ddp", world_size=2, dist_address="10.0.0.1"), [])
    assert distributed.maybe_spawn(_cfg(dist="ddp", world_size=1), []) is False  # one process in all
    assert "RANK" not in os.environ
    # a CPU node of a 2-node job is one process: this one, with its ranks set for init()
    assert distributed.maybe_spawn(_cfg(dist="ddp", world_size=2, node_rank=1, dist_address="10.1.2.3:4567"),
                                   []) is False
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) \
        == ("1", "2", "10.1.2.3", "4567")


def test_cli_indivisible_batch_exits_before_waiting_for_peers(tmp_path):
    # without the check, rank 0 would wait for a second node that never comes
    r = run_cli("pretrain", *tiny_args(tmp_path, batch_size=33), "--dist", "ddp", "--world_size", "2",
                "--dist_address", "127.0.0.1:1", timeout=120)
    assert r.returncode == 2, r.stderr
    assert "batch_size 33 is not divisible by the number of processes 2" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "logs").exists()
