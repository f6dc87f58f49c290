"""Where and how tensors run: device choice, autocast precision, seeds and the RNG state of a checkpoint."""
from __future__ import annotations

import os
import random
import sys
from typing import Optional

import numpy as np
import torch

from .errors import UserError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device; asking for CUDA without it is a UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was requested but CUDA is not available on this machine; "
                            "use --device cpu (or auto)")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu":
        raise UserError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N")
    return torch.device("cpu")


# what the allocators say when memory runs out: torch.OutOfMemoryError (CUDA), a RuntimeError from the CPU
# allocator (its type is no subclass of it) or MPS, Python's MemoryError (a numpy buffer)
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says an allocation failed for want of memory (any device)."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(e, (oom, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _OOM_WORDS)


def out_of_memory_error(device, asked: str, remedies: str) -> UserError:
    """The one message of an allocation that failed for want of memory, whatever the command: what was asked of
    ``device`` and the ways to ask less (the command knows which of its options set the memory)."""
    return UserError(f"out of memory on {device}: {asked} does not fit; {remedies}")


def tune_backends(device: torch.device, deterministic: bool) -> None:
    """On CUDA, let cuDNN time its convolution algorithms and keep the fastest (what ``simclr bench`` measures);
    not with ``--deterministic`` (the fastest may be a non-deterministic one). On a CPU that trains the fast way
    (:func:`fast_compute`), keep freed memory for the next step (:func:`keep_freed_cpu_memory`). Nothing else."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
    tune_cpu(device)


def tune_cpu(device: torch.device) -> None:
    """On a CPU that computes the fast way (:func:`fast_compute`: bf16, channels_last), keep the memory a step
    frees for the next (:func:`keep_freed_cpu_memory`); a CPU without native bf16 keeps the C library's defaults."""
    if device.type == "cpu" and fast_compute(device):
        keep_freed_cpu_memory()


# Why by hand: glibc's malloc hands a large freed block back to the kernel (munmap, or a trim of the heap's top),
# so the next step's activations of the same size land on new pages that the kernel zero-fills at their first
# touch. A ResNet-18 width-16 bf16 step (batch 128 x 2, channels_last) took 15,000-27,000 such page faults and
# 12-25% more time than with the memory kept (docs/benchmarks.md). PyTorch's CPU allocator has no cache of its
# own, and PyTorch's CPU tuning guide answers with jemalloc or tcmalloc through LD_PRELOAD, which a pip install
# cannot set up. glibc's own documented knobs (mallopt(3)) keep the blocks instead: up to 1 GiB comes from the
# heap, and up to 2 GiB free at its top stays mapped. The process's resident memory then stays at its peak,
# which a training process reaches at every step anyway.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_allocator = ""  # what keep_freed_cpu_memory set in this process ("": the C library's defaults)


def keep_freed_cpu_memory() -> str:
    """Have glibc's malloc keep the memory a training step frees, for the next step; returns what it set ("" where
    it set nothing: not Linux with glibc, or ``SIMCLR_CPU_MALLOC=0``). Process-wide and idempotent."""
    global _allocator
    if _allocator or os.environ.get("SIMCLR_CPU_MALLOC", "") == "0" or not sys.platform.startswith("linux"):
        return _allocator
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return ""
    if not mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1):  # musl's mallopt is a stub that returns 0
        return ""
    for threshold in (1 << 30, 32 << 20):  # some glibc releases accept at most 32 MiB (half a heap)
        if mallopt(_M_MMAP_THRESHOLD, threshold):
            _allocator = f"glibc malloc keeps freed memory (mmap threshold {threshold >> 20} MiB, trim threshold 2 GiB)"
            break
    return _allocator


def cpu_allocator() -> str:
    """What :func:`keep_freed_cpu_memory` set in this process, or "default" (env.json records it)."""
    return _allocator or "default"


def cpu_native_bf16() -> str:
    """The CPU instruction set that computes bf16 natively, as torch's own feature checks see it ("AMX",
    "AVX512-BF16"), or "" when there is none (bf16 would then be emulated: slower than fp32)."""
    if os.environ.get("SIMCLR_CPU_BF16", "") == "0":  # forced off: this CPU trains as one without native bf16
        return ""
    cpu = getattr(torch, "cpu", None)  # the checks exist in torch >= 2.3; an older torch counts as none

    def has(name: str) -> bool:
        check = getattr(cpu, name, None)
        try:
            return bool(check()) if check is not None else False
        except RuntimeError:
            return False

    return "AMX" if has("_is_amx_tile_supported") else "AVX512-BF16" if has("_is_avx512_bf16_supported") else ""


def fast_compute(device: torch.device) -> bool:
    """Whether ``auto`` means bf16 autocast and channels_last on ``device``: on CUDA, and on a CPU that computes
    bf16 natively (measured on an AVX512-BF16 EPYC, ResNet-18 width 16, batch 128 x 2: 3.4x fp32 NCHW per
    step). Elsewhere fp32 and NCHW, as the spec trains."""
    return device.type == "cuda" or (device.type == "cpu" and bool(cpu_native_bf16()))


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """``auto`` is bf16 where :func:`fast_compute` holds, fp32 (no autocast, None) elsewhere."""
    if precision == "auto":
        precision = "bf16" if fast_compute(device) else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def channels_last_on(value: str, device: torch.device) -> bool:
    """An ``auto``/``true``/``false`` channels_last switch on ``device``: ``auto`` follows :func:`fast_compute`."""
    return fast_compute(device) if value == "auto" else value in ("true", "on", True)


def describe_compute(amp: Optional[torch.dtype], channels_last: bool, device: torch.device) -> str:
    """One phrase for the run's first lines: 'bf16 autocast, channels_last (AVX512-BF16)'."""
    text = f"{precision_name(amp)}{' autocast' if amp is not None else ''}, " \
           f"{'channels_last' if channels_last else 'NCHW'}"
    if device.type == "cpu":
        native = cpu_native_bf16()
        text += f" (this CPU computes bf16 natively: {native})" if native else " (no native bf16 on this CPU)"
    return text


def precision_name(amp: Optional[torch.dtype]) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, "fp32")


class cpu_threads:
    """``with cpu_threads(device, 1):`` run small, memory-bound CPU work single-threaded: OpenMP's fan-out over
    tiny tensors costs more than it gains, and on a shared few-core machine it made such work 10x slower
    (measured here: the batched augmentation of 512 CIFAR views 0.17 s vs 2-5 s; a linear head's SGD step on
    1024 x 128 features 5 ms vs 54 ms). No effect on other devices."""

    def __init__(self, device: torch.device, n: int):
        self.active, self.n = torch.device(device).type == "cpu", n

    def __enter__(self):
        if self.active:
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.old)


def small_work_threads(device: torch.device, multiply_adds: int) -> cpu_threads:
    """``with small_work_threads(device, n):`` one CPU thread for work of fewer than ~16M multiply-adds per call
    (a linear head on frozen features), else torch's count."""
    return cpu_threads(device, 1 if multiply_adds < 2 ** 24 else torch.get_num_threads())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def cuda_rng_state(device: torch.device) -> Optional[torch.Tensor]:
    """The CUDA generator state of this process's own device (None off CUDA): what :func:`rng_state` keeps per
    rank. Only that device: the others belong to other processes (or do not exist when a run resumes on fewer)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def rng_state(cuda_by_rank: Optional[list] = None) -> dict:
    """Every global RNG as tensors and plain values (loadable with ``weights_only=True``), and the number of
    intra-op threads: a CPU kernel splits its sums by thread, so the count decides the float rounding.
    ``cuda_by_rank``: :func:`cuda_rng_state` of every rank, in rank order (gathered by the caller)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
             "threads": torch.get_num_threads()}
    if cuda_by_rank and any(t is not None for t in cuda_by_rank):
        state["cuda_by_rank"] = list(cuda_by_rank)
    return state


def _set_cuda_rng(state: dict, device: torch.device, rank: int) -> str:
    """Each rank restores its own device's generator from its own saved state; a device is never asked for
    unless it is this process's (resuming on fewer GPUs than the run saved with cannot fail)."""
    if device.type != "cuda":
        return ""
    by_rank = state.get("cuda_by_rank")
    if by_rank is not None:
        if rank < len(by_rank) and by_rank[rank] is not None:
            torch.cuda.set_rng_state(by_rank[rank], device)
            return ""
        return (f"note: the checkpoint has no CUDA generator state for rank {rank} (saved by {len(by_rank)} "
                f"process(es)): this rank's CUDA generator keeps its fresh seed")
    legacy = state.get("cuda")  # older checkpoints: rank 0's get_rng_state_all(), one state per GPU it saw
    index = device.index or 0
    if legacy is not None and rank == 0 and index < len(legacy):
        torch.cuda.set_rng_state(legacy[index], device)
    return ""


def set_rng_state(state: dict, device: torch.device = torch.device("cpu"), rank: int = 0) -> str:
    """Restore :func:`rng_state` in the process of ``rank`` training on ``device``. Returns a note for the run's
    log, "" when there is none.

    A process with another number of intra-op threads than the saved one takes its CPU sums in another
    order: the run goes on a few ulps apart from an uninterrupted one (measured: 1 vs 2 threads, 1e-2
    apart after 8 steps on a tiny ResNet). With deterministic algorithms on (``--deterministic``) the
    saved count is restored; otherwise the note says so."""
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    cuda_note = _set_cuda_rng(state, device, rank)
    return " ".join(n for n in (cuda_note, _set_threads(state)) if n)


def _set_threads(state: dict) -> str:
    saved, now = state.get("threads"), torch.get_num_threads()
    if not isinstance(saved, int) or saved < 1 or saved == now:
        return ""
    if torch.are_deterministic_algorithms_enabled():
        torch.set_num_threads(saved)
        return (f"note: {saved} intra-op thread(s) as in the run that saved the checkpoint (this process had "
                f"{now}): --deterministic keeps the summation order")
    return (f"note: the checkpoint was saved with {saved} intra-op thread(s), this process has {now}: CPU sums are "
            f"taken in another order, so the run continues a few ulps apart from an uninterrupted one "
            f"(--deterministic true restores the count)")
