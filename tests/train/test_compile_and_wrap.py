"""How the training module is wrapped and which defaults a device gets.

* several processes + compile: ``compile(DDP(model))`` and the project's own cross-process batch norm;
* ``--compile auto`` on CUDA falls back to eager with one warning when compiling fails (at ``torch.compile`` or at
  the first call), ``--compile true`` stops on the error, and a later error that is not a compile error is raised;
* ``channels_last``/``compile`` ``auto``: on for CUDA, off on the CPU (CPU runs are exactly as before), an explicit
  value wins; cuDNN autotuning on CUDA unless ``--deterministic``.
"""
import datetime
import logging

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from simclr import config as config_lib
from simclr.data.datasets import ArrayImages
from simclr.models import GlobalBatchNorm, convert_sync_batchnorm
from simclr.options import PretrainConfig
from simclr.runtime import tune_backends
from simclr.train import step as step_mod
from simclr.train.step import EagerFallback, build, wrap


def _images() -> ArrayImages:
    rng = np.random.default_rng(0)
    return ArrayImages(rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8), [i % 2 for i in range(16)],
                       ["a", "b"], "toy", 16)


def _cfg(**over) -> PretrainConfig:
    values = dict(arch="resnet18", width=8, data="cifar10", batch_size=8, iters=2, device="cpu", seed=0,
                  workers=0, proj_dim=8)
    values.update(over)
    return config_lib.build(PretrainConfig, values)


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank: DDP can be built in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_several_processes_compile_the_ddp_module(monkeypatch, one_rank_group):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    p = build(_cfg(compile="true"), _images(), torch.device("cpu"))
    wrap(p, distributed_run=True)
    assert len(compiled) == 1 and isinstance(compiled[0], nn.parallel.DistributedDataParallel)
    assert compiled[0].module is p.model and p.forward is compiled[0]


def test_compiled_runs_use_our_cross_process_batch_norm_on_cuda():
    def net():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    assert type(convert_sync_batchnorm(net(), torch.device("cuda"))[1]) is nn.SyncBatchNorm  # eager CUDA
    assert type(convert_sync_batchnorm(net(), torch.device("cuda"), compiled=True)[1]) is GlobalBatchNorm


def test_build_asks_for_the_compilable_batch_norm_when_compiling(monkeypatch):
    seen = []
    monkeypatch.setattr(step_mod, "convert_sync_batchnorm", lambda m, d, compiled: seen.append(compiled) or m)
    build(_cfg(compile="true"), _images(), torch.device("cpu"), world=2)
    build(_cfg(), _images(), torch.device("cpu"), world=2)  # auto on the CPU: not compiled
    assert seen == [True, False]


# --------------------------------------------------------------------------------------------
# compile failures
# --------------------------------------------------------------------------------------------
def _parts_and_input(compile_value="auto"):
    cfg = _cfg(compile=compile_value)
    torch.manual_seed(0)
    p = build(cfg, _images(), torch.device("cpu"))
    p.compile = True  # as on CUDA: compile "auto" resolves on there
    return cfg, p, torch.rand(4, 3, 16, 16)


def test_compile_raising_falls_back_to_eager_with_one_warning(monkeypatch, said):
    def broken(module, **kw):
        raise RuntimeError("no compiler for this platform")

    monkeypatch.setattr(torch, "compile", broken)
    cfg, p, x = _parts_and_input()
    wrap(p, distributed_run=False)
    assert isinstance(p.forward, EagerFallback)
    for _ in range(3):
        assert torch.equal(p.forward(x)["z"], p.model(x)["z"])
    warnings = said(logging.WARNING)
    assert len(warnings) == 1 and "torch.compile failed" in warnings[0] and "no compiler" in warnings[0]


class _FailsOnCall(nn.Module):
    """What torch.compile returns when compiling fails at the first call; counts its calls."""

    def __init__(self, error: Exception, after: int = 0):
        super().__init__()
        self.error, self.after, self.calls = error, after, 0

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise self.error
        return {"z": torch.zeros(1)}


def test_compiled_module_raising_on_first_call_falls_back_to_eager_once(monkeypatch, said):
    fake = _FailsOnCall(RuntimeError("inductor: C++ compile failed"))
    monkeypatch.setattr(torch, "compile", lambda module, **kw: fake)
    cfg, p, x = _parts_and_input()
    wrap(p, distributed_run=False)
    p.model.eval()  # same output twice (no batch statistics)
    ref = p.model(x)["z"]
    for _ in range(3):
        assert torch.equal(p.forward(x)["z"], ref)  # the eager model's result, not the stand-in's zeros
    warnings = said(logging.WARNING)
    assert fake.calls == 1 and len(warnings) == 1 and "C++ compile failed" in warnings[0]


def test_a_later_error_that_is_not_compiling_is_raised(monkeypatch, said):
    fake = _FailsOnCall(ValueError("a real bug"), after=1)
    monkeypatch.setattr(torch, "compile", lambda module, **kw: fake)
    cfg, p, x = _parts_and_input()
    wrap(p, distributed_run=False)
    p.forward(x)
    with pytest.raises(ValueError, match="a real bug"):
        p.forward(x)
    assert said(logging.WARNING) == []


def test_compile_true_stops_on_a_compile_error(monkeypatch):
    def broken(module, **kw):
        raise RuntimeError("no compiler for this platform")

    monkeypatch.setattr(torch, "compile", broken)
    cfg, p, x = _parts_and_input("true")
    with pytest.raises(RuntimeError, match="no compiler"):
        wrap(p, distributed_run=False)


def test_eager_fallback_forwards_no_sync_of_the_wrapped_module(monkeypatch, one_rank_group):
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    cfg, p, x = _parts_and_input()
    wrap(p, distributed_run=True)
    assert p.forward.no_sync.__self__ is p.forward.module  # the grad cache's per-chunk no_sync reaches DDP


# --------------------------------------------------------------------------------------------
# defaults per device
# --------------------------------------------------------------------------------------------
def test_auto_is_off_on_the_cpu_and_an_explicit_value_wins(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kw: pytest.fail("compiled on the CPU by default"))
    p = build(_cfg(), _images(), torch.device("cpu"))
    wrap(p, distributed_run=False)
    assert (p.channels_last, p.compile, p.forward) == (False, False, p.model)  # exactly the CPU run of before
    assert next(p.model.parameters()).is_contiguous()
    p = build(_cfg(channels_last="true"), _images(), torch.device("cpu"))
    assert p.channels_last and p.model.convnet.conv1.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("argv, expected", [
    ([], ("auto", "auto")),
    (["--compile"], ("true", "auto")),
    (["--compile", "false", "--channels_last", "true"], ("false", "true")),
    (["--channels_last", "no"], ("auto", "false")),
])
def test_command_line_spellings(argv, expected):
    cfg, _ = config_lib.parse(PretrainConfig, argv)
    assert (cfg.compile, cfg.channels_last) == expected


def test_yaml_booleans_of_older_configs_still_read(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("channels_last: true\ncompile: false\n")
    cfg, _ = config_lib.parse(PretrainConfig, ["--config", str(path)])
    assert (cfg.channels_last, cfg.compile) == ("true", "false")
    with pytest.raises(config_lib.ConfigError, match="allowed: auto, true, false"):
        config_lib.parse(PretrainConfig, ["--compile", "sometimes"])


def test_cudnn_autotuning_on_cuda_only_and_not_when_deterministic(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    tune_backends(torch.device("cpu"), deterministic=False)
    assert torch.backends.cudnn.benchmark is False
    tune_backends(torch.device("cuda:0"), deterministic=False)
    assert torch.backends.cudnn.benchmark is True
    tune_backends(torch.device("cuda:0"), deterministic=True)
    assert torch.backends.cudnn.benchmark is False
