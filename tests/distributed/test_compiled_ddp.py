"""Two processes (gloo): ``compile(DDP(model))`` with the project's cross-process batch norm trains like eager DDP.

Compiled with torch.compile's ``aot_eager`` backend (dynamo's tracing and the autograd graph, without inductor's
C++ code generation, which takes minutes on a small CPU). The batch norm's statistics cross the processes inside
the compiled graph; the test counts dynamo's graph breaks (the same as with plain batch norm: none in the model)
and compares loss and every gradient with the eager DDP step on the same batch.
"""
import datetime
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    from torch._dynamo.utils import counters

    from simclr import config as config_lib
    from simclr.data.datasets import ArrayImages
    from simclr.models import GlobalBatchNorm
    from simclr.options import PretrainConfig
    from simclr.train.step import build, forward_backward, wrap

    real_compile = torch.compile
    torch.compile = lambda module, **kw: real_compile(module, backend="aot_eager")
    rng = np.random.default_rng(0)
    images = ArrayImages(rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8), [0] * 16, ["a"], "toy", 16)
    x = torch.rand(2 * 4, 3, 16, 16, generator=torch.Generator().manual_seed(10 + rank))  # this rank's rows
    res = {}
    for compile_value, sync_bn in (("false", True), ("true", True), ("true", False)):
        cfg = config_lib.build(PretrainConfig, dict(arch="resnet18", width=8, data="cifar10", batch_size=8, iters=2,
                                                    device="cpu", seed=0, workers=0, proj_dim=8,
                                                    compile=compile_value, sync_bn=sync_bn))
        torch.manual_seed(0)
        p = build(cfg, images, torch.device("cpu"), rank, WORLD)
        wrap(p, distributed_run=True)
        torch._dynamo.reset()  # each configuration compiled from scratch, its graph breaks counted afresh
        counters.clear()
        loss, _, _ = forward_backward(p, x)
        res[compile_value + ("" if sync_bn else " plain bn")] = {
            "loss": loss.item(),
            "grads": {k: q.grad.clone() for k, q in p.model.named_parameters() if q.grad is not None},
            "bn": sorted({type(m).__name__ for m in p.model.modules() if isinstance(m, torch.nn.BatchNorm2d)
                          or isinstance(m, GlobalBatchNorm)}),
            "forward": type(p.forward).__name__, "breaks": sum(counters["graph_break"].values())}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # two processes tracing a small ResNet (~1 min on a shared 2-core box)
def test_compiled_ddp_with_global_batch_norm_equals_eager_ddp():
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(os.path.join(tmp, "store"), tmp), nprocs=WORLD, join=True,
                           start_method="spawn")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    for res in results:
        eager, compiled = res["false"], res["true"]
        assert compiled["forward"] == "OptimizedModule" and eager["forward"] == "DistributedDataParallel"
        assert compiled["bn"] == eager["bn"] == ["GlobalBatchNorm"]
        # DDP's own wrapper breaks the graph at its bookkeeping (logging, hooks: the same with plain batch norm);
        # the model's graph has none: a break per batch-norm layer would add 20 here
        assert compiled["breaks"] == res["true plain bn"]["breaks"] <= 4
        assert abs(compiled["loss"] - eager["loss"]) < 1e-5
        assert compiled["grads"].keys() == eager["grads"].keys() and len(eager["grads"]) > 20
        for k, g in eager["grads"].items():
            assert torch.allclose(compiled["grads"][k], g, atol=1e-5, rtol=1e-4), k
    assert results[0]["true"]["grads"].keys() == results[1]["true"]["grads"].keys()
