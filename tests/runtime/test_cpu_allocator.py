"""The CPU allocator policy (simclr.runtime.keep_freed_cpu_memory): on a CPU that trains the fast way, memory a step
frees is kept for the next step instead of going back to the kernel and coming back as zero-filled new pages."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from simclr import runtime

CPU = torch.device("cpu")

# one process per setting: the C library's malloc settings are process-wide and cannot be undone
_FAULTS = r"""
import resource, sys
import torch
from simclr import runtime
if sys.argv[1] == "keep":
    print(runtime.keep_freed_cpu_memory() or "none", file=sys.stderr)

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

for _ in range(10):  # 40 MiB: above glibc's largest dynamic mmap threshold (32 MiB); the heap settles in a few
    x = torch.ones(10 * 2 ** 20)
    del x
before = faults()
for _ in range(5):  # what a training step does with an activation: allocate, write, free
    x = torch.ones(10 * 2 ** 20)
    del x
print((faults() - before) // 5)
"""


def _faults_per_step(mode: str, **env) -> tuple[int, str]:
    import os
    r = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.strip()), r.stderr.strip()


@pytest.mark.slow  # three real processes: `make test` runs it, `make test-fast` leaves it out
def test_kept_memory_is_reused_without_page_faults():
    """A real process each (the point is the process-wide allocator): with the C library's defaults a freed 40 MiB
    block goes back to the kernel, and writing the next one faults in its 10,240 pages again; with the policy the
    block is reused and no page faults. ``SIMCLR_CPU_MALLOC=0`` leaves the defaults."""
    default, _ = _faults_per_step("default")
    kept, said = _faults_per_step("keep")
    off, said_off = _faults_per_step("keep", SIMCLR_CPU_MALLOC="0")
    pages = 40 * 2 ** 20 // 4096
    assert default >= pages * 0.9, default
    assert said.startswith("glibc malloc keeps freed memory") and kept < pages * 0.05, (kept, said)
    assert said_off == "none" and off >= pages * 0.9, off


def test_the_policy_follows_the_fast_compute_rule(monkeypatch):
    """Applied where a CPU computes bf16 natively (pretraining's tune_backends, evaluation's tune_cpu); a CPU without
    native bf16 and a GPU keep the C library's defaults."""
    calls = []
    monkeypatch.setattr(runtime, "keep_freed_cpu_memory", lambda: calls.append(1) or "kept")
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: "AVX512-BF16")
    runtime.tune_backends(CPU, deterministic=False)
    runtime.tune_cpu(CPU)
    assert len(calls) == 2
    runtime.tune_cpu(torch.device("cuda"))
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: "")
    runtime.tune_backends(CPU, deterministic=False)
    runtime.tune_cpu(CPU)
    assert len(calls) == 2
