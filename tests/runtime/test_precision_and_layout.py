"""Precision and memory layout on a CPU (simclr.runtime): ``auto`` means bf16 autocast and channels_last where the
CPU computes bf16 natively, and exactly today's fp32/NCHW (and the reference loader) where it does not. The
detection is forced either way, so each test runs on any CPU."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli, run_folder, tiny_args
from simclr import runtime
from simclr.checkpoint import read

CPU = torch.device("cpu")


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: "AVX512-BF16")


@pytest.fixture
def no_bf16(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: "")


def test_auto_resolves_by_what_the_cpu_computes_natively(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: "AMX")
    assert runtime.autocast_dtype("auto", CPU) is torch.bfloat16
    assert runtime.channels_last_on("auto", CPU)
    assert runtime.autocast_dtype("fp32", CPU) is None  # --precision fp32 forces fp32 always
    assert not runtime.channels_last_on("false", CPU)
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: "")
    assert runtime.autocast_dtype("auto", CPU) is None
    assert not runtime.channels_last_on("auto", CPU)
    assert runtime.autocast_dtype("bf16", CPU) is torch.bfloat16  # asked for: given, native or not


def test_detection_asks_torch_and_names_the_instruction_set(monkeypatch):
    monkeypatch.delenv("SIMCLR_CPU_BF16", raising=False)  # the suite forces it off (conftest)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert runtime.cpu_native_bf16() == "AVX512-BF16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert runtime.cpu_native_bf16() == "AMX"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert runtime.cpu_native_bf16() == ""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setenv("SIMCLR_CPU_BF16", "0")  # forced off whatever the CPU has
    assert runtime.cpu_native_bf16() == ""


def _build(**over):
    from simclr import config as config_lib
    from simclr.data import get_dataset, maybe_subset
    from simclr.options import PretrainConfig
    from simclr.train import build
    cfg = config_lib.build(PretrainConfig, dict(data="cifar10", arch="resnet18", width=8, batch_size=16, iters=2,
                                                seed=0, device="cpu", workers=0, **over))
    images = maybe_subset(get_dataset("cifar10", "pretrain", "", 0), 64, 0)
    return cfg, build(cfg, images, CPU)


def test_native_bf16_builds_a_bf16_channels_last_fast_step_with_an_fp32_loss(native_bf16):
    from simclr.data.fast import FastLoader
    from simclr.train import train_step
    cfg, parts = _build()
    assert parts.amp_dtype is torch.bfloat16 and parts.channels_last
    assert isinstance(parts.loader, FastLoader)  # the batched input path, in a background thread
    conv = next(m for m in parts.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x, _ = next(iter(parts.loader.batches(0, 1)))
    loss, acc, updated = train_step(parts, x, 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and updated


def test_without_native_bf16_the_cpu_step_is_todays(no_bf16):
    """fp32, NCHW, PIL transforms in workers: a CPU without native bf16 trains exactly as before."""
    from simclr.data.loaders import ReferenceLoader
    _, parts = _build()
    assert parts.amp_dtype is None and not parts.channels_last
    assert isinstance(parts.loader, ReferenceLoader)
    conv = next(m for m in parts.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last) or conv.weight.shape[-1] == 1


def test_precision_fp32_forces_fp32_on_a_bf16_cpu(native_bf16):
    _, parts = _build(precision="fp32", channels_last="false", loader="reference")
    assert parts.amp_dtype is None and not parts.channels_last


def test_a_run_prints_and_records_its_compute_and_resumes_on_another_with_one_note(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: "AVX512-BF16")
    args = tiny_args(tmp_path, iters=4, stop_after=2, verbose="true")
    r = run_cli("pretrain", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bf16 autocast, channels_last (this CPU computes bf16 natively: AVX512-BF16)" in r.stderr
    run = run_folder(tmp_path / "logs")
    env = json.loads((run / "env.json").read_text())
    assert env["compute"] == {"precision": "bf16", "channels_last": True}
    assert env["cpu_allocator"] == runtime.cpu_allocator() != "default"  # the fast way keeps freed memory
    ck = read(run / "checkpoints" / "checkpoint-00000002.pt")
    assert ck["compute"] == {"precision": "bf16", "channels_last": True}

    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: "")  # the run moved to a CPU without bf16
    r = run_cli("pretrain", "--resume", run, "--verbose", "true")
    assert r.returncode == 0, r.stderr[-2000:]
    notes = [line for line in r.stderr.splitlines() if "was trained with bf16, channels_last" in line]
    assert len(notes) == 1 and "continues with fp32, NCHW" in notes[0]
    assert json.loads((run / "status.json").read_text())["step"] == 4
    assert read(run / "checkpoints" / "checkpoint-00000004.pt")["compute"] == {"precision": "fp32",
                                                                              "channels_last": False}


def test_evaluation_extracts_features_by_the_same_rule(tmp_path, trained_ckpt, monkeypatch):
    common = ["--train_subset", "64", "--test_subset", "40", "--root", tmp_path / "e", "--verbose", "false",
              "--device", "cpu", "--workers", "0"]
    seen = {}
    for native, name in (("AVX512-BF16", "bf16"), ("", "fp32")):
        monkeypatch.setattr(runtime, "cpu_native_bf16", lambda native=native: native)
        r = run_cli("knn", "--encoder_ckpt", trained_ckpt, "--name", name, *common)
        assert r.returncode == 0, r.stderr[-2000:]
        (res,) = (tmp_path / "e" / name).glob("*/eval.json")
        seen[name] = json.loads(res.read_text())["compute"]
    assert seen == {"bf16": {"precision": "bf16", "channels_last": True},
                    "fp32": {"precision": "fp32", "channels_last": False}}
