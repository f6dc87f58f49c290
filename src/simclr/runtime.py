"""Where and how tensors run: device choice, autocast precision, seeds and the RNG state of a checkpoint."""
from __future__ import annotations

import random
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


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """``auto`` is bf16 on CUDA and fp32 (no autocast, None) elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG as tensors and plain values (loadable with ``weights_only=True``), and the number of
    intra-op threads: a CPU kernel splits its sums by thread, so the count decides the float rounding."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
             "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> str:
    """Restore :func:`rng_state`. Returns a note for the run's log, "" when there is none.

    A process with another number of intra-op threads than the saved one takes its CPU sums in another
    order: the run goes on a few ulps apart from an uninterrupted one (measured: 1 vs 2 threads, 1e-2
    apart after 8 steps on a tiny ResNet). With deterministic algorithms on (``--deterministic``) the
    saved count is restored; otherwise the note says so."""
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
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
