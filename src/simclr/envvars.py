"""The environment variables the package reads as numbers, validated where they enter.

A launcher, a job script or a typo sets them (``SIMCLR_DIST_TIMEOUT=5m``, ``RANK=``, ``MASTER_PORT=http``);
read with a bare ``int()`` they became a ``ValueError`` traceback at import time or deep inside torch.
Each is read here: unset or empty means the default, anything else must be an integer in its range, or the
command stops with one line naming the variable, its value and what it must be.
"""
from __future__ import annotations

import os

from .errors import ConfigError

# name: (lowest, highest, what it is) -- the ranks' upper bound is a sanity limit, not a cluster size
RANGES = {
    "SIMCLR_DIST_TIMEOUT": (1, 7 * 24 * 3600, "seconds a collective may wait for the other ranks"),
    "SIMCLR_PROCS_PER_NODE": (1, 1024, "training processes per node"),
    "WORLD_SIZE": (1, 1 << 20, "the number of processes"),
    "RANK": (0, 1 << 20, "this process's rank"),
    "LOCAL_RANK": (0, 1024, "this process's rank on its node"),
    "SLURM_NTASKS": (1, 1 << 20, "the number of processes"),
    "SLURM_PROCID": (0, 1 << 20, "this process's rank"),
    "SLURM_LOCALID": (0, 1024, "this process's rank on its node"),
    "MASTER_PORT": (1, 65535, "the TCP port of rank 0's store"),
    "TORCHELASTIC_RESTART_COUNT": (0, 1 << 20, "torchrun's restart count"),
}


def is_set(name: str) -> bool:
    return os.environ.get(name, "").strip() != ""


def env_int(name: str, default: int) -> int:
    """The integer in environment variable ``name`` (``default`` when unset or empty), within its range."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    lo, hi, what = RANGES[name]
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise ConfigError(f"environment variable {name}={raw[:40]!r} must be an integer from {lo} to {hi} ({what}); "
                          f"fix it or unset it")
    return value
