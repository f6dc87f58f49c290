"""The CUDA fast path, run without a GPU, and a detector of every host synchronisation inside a step.

**Fake CUDA.** ``test_fast_path_step_on_fake_cuda_has_no_host_sync`` runs one training step of the fast path with
``device="cuda"`` under ``torch._subclasses.FakeTensorMode``: tensors carry a CUDA device, shape, dtype and
strides but no data, so every kernel's dispatch is real (CUDA-only branches such as the sync-free colour jitter,
the multi-tensor LARS, bf16 autocast on CUDA, ``channels_last`` convolutions) while nothing is computed. The step
covers: the dataset on the device, the step's indices and batched augmentation (:mod:`simclr.data.batch_aug`),
``channels_last``, bf16 autocast, NT-Xent, the gradient cache, the divergence guard (``stop``), the foreach LARS
update and the online probe.

What fake CUDA cannot reach, and where it is covered instead:

* **autograd.** The autograd engine starts a device thread that asks the CUDA driver for a context, which fails
  without one; under fake CUDA ``backward``/``autograd.grad`` are replaced by stubs that hand back zero gradients
  of the right shapes (so the update still runs). The backward kernels are covered on the CPU by
  ``test_cpu_step_of_the_real_code_has_no_host_sync`` with the same detector.
* **collectives** (DDP's all-reduce, the all-gather of NT-Xent, the cross-process batch norm): not run here; the
  CPU/gloo tests of tests/distributed/test_data_parallel.py and tests/distributed/test_compiled_ddp.py run them with
  real processes.
* ``torch.Generator(device="cuda")`` needs a driver: the fast loader gets a CPU generator (fake kernels accept it).
* ``nn.Module.to`` swaps parameters in place, which fake tensors refuse (the fake-tensor bookkeeping holds weak
  references): a stand-in ``to`` replaces each parameter and buffer by its converted copy instead.
* The epoch's index permutation is copied to the device once per epoch (a blocking copy): the detector watches
  the second step of the epoch, after an unwatched first one (which also makes the one-time copies of constants).

**The detector** (:class:`NoHostSync`) is a ``TorchDispatchMode``: it fails on any op that makes the host wait for
the device: ``.item()``/``bool()``/``float()`` of a tensor (``aten._local_scalar_dense``), ``nonzero`` and what is
built on it (boolean-mask indexing and assignment, ``masked_select``, one-argument ``where``), ``unique``,
``bincount``, ``repeat_interleave`` with tensor repeats and no output size, ``equal``, and any device-to-host copy
or blocking host-to-device copy. It works on CPU tensors too (there these ops are cheap, but the same code on a
GPU would wait).
"""
from __future__ import annotations

import traceback

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from simclr import config as config_lib
from simclr import loss as loss_mod
from simclr.data.datasets import ArrayImages
from simclr.options import PretrainConfig
from simclr.train import step as step_mod
from simclr.train.step import build, train_step, wrap

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_dim, aten._unique,
            aten._unique2, aten.unique_consecutive, aten.unique_dim_consecutive, aten.bincount, aten.equal,
            aten.is_nonzero, aten.argwhere, aten.nonzero_numpy}
MASK_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _sync_reason(func, args, kwargs, out) -> str:
    """Why ``func(*args, **kwargs) -> out`` makes the host wait for the device ('' when it does not)."""
    packet = func.overloadpacket
    if packet in SYNC_OPS:
        return f"{func} reads a value or a data-dependent size back to the host"
    if packet in MASK_INDEX_OPS and any(_is_mask(i) for i in (args[1] if len(args) > 1 else ())):
        return f"{func} with a boolean mask (its nonzero counts the mask on the host)"
    if packet is aten.where and len(args) == 1:
        return f"{func} with one argument is nonzero"
    if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor \
            and kwargs.get("output_size") is None:
        return f"{func} without output_size sums the repeats on the host"
    if packet in (aten._to_copy, aten.copy_) and isinstance(out, torch.Tensor):
        src = args[1] if packet is aten.copy_ else args[0]
        dst = args[0] if packet is aten.copy_ else out
        if isinstance(src, torch.Tensor) and (src.device.type == "cpu") != (dst.device.type == "cpu"):
            if dst.device.type == "cpu":
                return f"{func}: a device-to-host copy"
            if not (args[2] if packet is aten.copy_ and len(args) > 2 else kwargs.get("non_blocking", False)):
                return f"{func}: a blocking host-to-device copy"
    return ""


class NoHostSync(TorchDispatchMode):
    """Records every op that synchronises the host with the device, with where it was called from."""

    def __init__(self):
        super().__init__()
        self.found: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._record(_sync_reason(func, args, kwargs, None))  # before running: under fake tensors these ops raise
        out = func(*args, **kwargs)
        self._record(_sync_reason(func, args, kwargs, out) if func.overloadpacket in (aten._to_copy, aten.copy_)
                     else "")
        return out

    def _record(self, why: str) -> None:
        if why:
            here = [f"{f.filename.split('/src/')[-1]}:{f.lineno}" for f in traceback.extract_stack()
                    if "/src/simclr/" in f.filename]
            self.found.append(f"{why} (at {' <- '.join(reversed(here)) or '?'})")

    def check(self) -> None:
        assert not self.found, "host synchronisation in the step:\n" + "\n".join(self.found)


# --------------------------------------------------------------------------------------------
# the detector itself
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sync", [
    lambda x: x.sum().item(),
    lambda x: bool(x.sum() > 0),
    lambda x: x[x > 0.5],
    lambda x: x.masked_select(x > 0.5),
    lambda x: torch.where(x > 0.5),
    lambda x: torch.unique(x),
    lambda x: x.nonzero(),
    lambda x: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3])),
])
def test_detector_catches_each_kind_of_host_sync(sync):
    x = torch.rand(8)
    with NoHostSync() as d:
        sync(x)
    assert d.found


def test_detector_catches_copies_between_host_and_device(fake_cuda):
    cuda = torch.ones(3, device="cuda")
    with NoHostSync() as d:
        cuda.cpu()  # also what .tolist() and .numpy() of a CUDA tensor do (on a CPU tensor they dispatch nothing)
        torch.ones(3).to("cuda")
    assert len(d.found) == 2 and "device-to-host" in d.found[0] and "blocking host-to-device" in d.found[1]
    with NoHostSync() as d:
        torch.ones(3).to("cuda", non_blocking=True)  # from pinned memory: queued, the host does not wait
        cuda + 1
    d.check()


def test_detector_passes_sync_free_ops():
    x = torch.rand(8, 4)
    with NoHostSync() as d:
        i = torch.arange(8)
        x.index_put((i, i % 4), x.new_full((), -1.0))
        torch.where(x > 0.5, x, 0.0).masked_fill(x < 0.1, 0).gather(1, (i % 4).unsqueeze(1))
        x[i[:3]] = 0
        torch.arange(3).repeat_interleave(2)
    d.check()


# --------------------------------------------------------------------------------------------
# one fast-path step on fake CUDA
# --------------------------------------------------------------------------------------------
def _cfg(**over) -> PretrainConfig:
    # channels_last and precision are left at auto: on CUDA that is channels_last and bf16. Compiling is off:
    # torch.compile traces with fake tensors of its own (the eager kernels are what this test dispatches)
    values = dict(arch="resnet18", width=8, data="cifar10", batch_size=8, iters=4, loader="fast", device="cuda",
                  compile="false", opt="lars", online_probe=True, grad_cache_chunks=2, on_nan="stop", seed=0,
                  workers=0, proj_dim=16)
    values.update(over)
    return config_lib.build(PretrainConfig, values)


def _images(n: int = 16, size: int = 32) -> ArrayImages:
    rng = np.random.default_rng(0)
    return ArrayImages(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), [i % 3 for i in range(n)],
                       ["a", "b", "c"], "toy", size)


def _module_to(self, *args, **kwargs):
    """nn.Module.to for fake tensors: each parameter/buffer replaced by its converted copy (see the docstring)."""
    layout_only = "memory_format" in kwargs and not args
    for mod in self.modules():
        for k, p in list(mod._parameters.items()):
            if p is not None and not (layout_only and p.dim() != 4):
                mod._parameters[k] = nn.Parameter(p.detach().to(*args, **kwargs), requires_grad=p.requires_grad)
        for k, b in list(mod._buffers.items()):
            if b is not None and not layout_only:
                mod._buffers[k] = b.to(*args, **kwargs)
    return self


@pytest.fixture
def fake_cuda(monkeypatch):
    """FakeTensorMode with CUDA tensors, bf16 autocast on CUDA allowed, the stand-ins of the docstring."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    import torch.cuda.amp.common as amp_common

    monkeypatch.setattr(amp_common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(nn.Module, "to", _module_to)
    cpu_generator = torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda device=None: cpu_generator())
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def _stub_autograd(monkeypatch, modules):
    """backward/autograd.grad -> zero gradients of the right shape, device and dtype (see the docstring)."""
    calls = []

    def backward(self, gradient=None, *args, **kwargs):
        calls.append("backward")
        for q in [q for m in modules() for q in m.parameters()]:
            q.grad = torch.zeros_like(q) if q.grad is None else q.grad + 0

    def grad(outputs, inputs, *args, **kwargs):
        calls.append("grad")
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        return tuple(torch.zeros_like(i) for i in inputs)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    monkeypatch.setattr(torch.autograd, "grad", grad)
    return calls


@pytest.mark.parametrize("grad_cache_chunks", [0, 2])
def test_fast_path_step_on_fake_cuda_has_no_host_sync(fake_cuda, monkeypatch, grad_cache_chunks):
    from torch._subclasses.fake_tensor import FakeTensor

    cfg = _cfg(grad_cache_chunks=grad_cache_chunks)
    torch.manual_seed(0)
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        real = step_mod.build_model(cfg, 32)  # initialised for real (init draws random numbers), then made fake
    monkeypatch.setattr(step_mod, "build_model", lambda c, size: real)
    device = torch.device("cuda:0")
    p = build(cfg, _images(), device)
    wrap(p, distributed_run=False)
    calls = _stub_autograd(monkeypatch, lambda: [p.model, p.probe.head])
    weight = p.model.convnet.conv1.weight if hasattr(p.model.convnet, "conv1") else next(p.model.parameters())
    assert isinstance(weight, FakeTensor) and weight.device == device
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert p.optimizer.param_groups[0]["foreach"] and p.amp_dtype == torch.bfloat16 and p.channels_last

    seen = []
    real_forward = p.forward.forward

    def forward(x):  # what the network sees: the batch on the device, channels_last, run under bf16 autocast
        seen.append((x.device, x.is_contiguous(memory_format=torch.channels_last), torch.is_autocast_enabled("cuda")))
        out = real_forward(x)
        seen.append(out["z"].dtype)
        return out

    monkeypatch.setattr(p.forward, "forward", forward)
    batches = p.loader.batches(0, 2)
    x, y = next(batches)  # the epoch's first step: its permutation is copied to the device once (see docstring)
    train_step(p, x, 0, y=y)
    seen.clear()
    with NoHostSync() as detector:
        x, y = next(batches)
        loss, acc, updated = train_step(p, x, 1, y=y)
    detector.check()
    assert x.device == device and x.shape == (2 * 8, 3, 32, 32) and y.device == device
    assert loss.device == device and loss.dtype == torch.float32 and updated
    assert seen and seen[0] == (device, True, True) and torch.bfloat16 in seen
    assert calls.count("grad" if grad_cache_chunks else "backward") >= 1


def test_fake_cuda_step_catches_a_boolean_mask_in_the_loss(fake_cuda, monkeypatch):
    """The detector is live on the fake CUDA step: a loss that indexes with a boolean mask is reported."""
    cfg = _cfg(grad_cache_chunks=0, online_probe=False)
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        real = step_mod.build_model(cfg, 32)
    monkeypatch.setattr(step_mod, "build_model", lambda c, size: real)
    p = build(cfg, _images(), torch.device("cuda:0"))
    wrap(p, distributed_run=False)
    _stub_autograd(monkeypatch, lambda: [p.model])
    real_nt_xent = loss_mod.nt_xent

    def masked_nt_xent(z, t, m):
        loss, acc = real_nt_xent(z, t, m)
        return loss + 0 * z[z[:, 0] > 0].sum(), acc  # what the old loss did: x[mask] calls nonzero

    monkeypatch.setattr(loss_mod, "nt_xent", masked_nt_xent)  # what the step's criterion calls
    batches = p.loader.batches(0, 2)
    x, y = next(batches)
    with pytest.raises(Exception) as info:  # fake tensors cannot size a masked result; the detector saw it first
        with NoHostSync() as detector:
            train_step(p, x, 0, y=y)
    assert any("boolean mask" in f for f in detector.found), (detector.found, info.value)


# --------------------------------------------------------------------------------------------
# the same step on the CPU, for real (autograd included)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad_cache_chunks", [0, 2])
def test_cpu_step_of_the_real_code_has_no_host_sync(grad_cache_chunks):
    """Forward, NT-Xent, backward (real autograd), the guard, foreach LARS and the probe do no host sync. The
    batch is made outside the detector: on the CPU the colour jitter counts its hue images (cheap there; the
    CUDA branch is the sync-free one, checked on fake CUDA above)."""
    cfg = _cfg(device="cpu", grad_cache_chunks=grad_cache_chunks)
    torch.manual_seed(0)
    p = build(cfg, _images(), torch.device("cpu"), foreach=True)
    wrap(p, distributed_run=False)
    batches = p.loader.batches(0, 2)
    x, y = next(batches)
    before = [q.detach().clone() for q in p.model.parameters()]
    with NoHostSync() as detector:
        loss, acc, updated = train_step(p, x, 0, y=y)
    detector.check()
    assert updated and torch.isfinite(loss)
    assert any(not torch.equal(a, q) for a, q in zip(before, p.model.parameters()))  # the update happened


def test_skip_policy_decides_with_exactly_one_sync():
    """``--on_nan skip`` reads the finiteness flag at once (by design: the update is skipped or not): one
    ``_local_scalar_dense`` and nothing else."""
    cfg = _cfg(device="cpu", grad_cache_chunks=0, online_probe=False, on_nan="skip")
    p = build(cfg, _images(), torch.device("cpu"), foreach=True)
    wrap(p, distributed_run=False)
    x, y = next(p.loader.batches(0, 1))
    with NoHostSync() as detector:
        train_step(p, x, 0, y=y)  # p.guard: the --on_nan skip of the config
    assert len(detector.found) == 1 and "_local_scalar_dense" in detector.found[0], detector.found
