"""Shared test fixtures. Real data comes from DATA_ROOT (../shared/data next to the clone)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if not os.environ.get("DATA_ROOT"):
    os.environ["DATA_ROOT"] = str((REPO.parent / "shared" / "data").resolve())
os.environ.setdefault("SIMCLR_CACHE", str(REPO / ".cache" / "simclr"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ["DATA_ROOT"])
    if not (root / "cifar10" / "train").is_dir():
        pytest.fail(f"real CIFAR-10 not found under DATA_ROOT={root}; set DATA_ROOT=../shared/data")
    return root


def tiny_args(tmp_path: Path, **over) -> list:
    """Command-line args of a tiny, fast CPU pretraining run on real CIFAR-10."""
    base = dict(data="cifar10", arch="resnet18", width=8, train_subset=256, test_subset=200, batch_size=32,
                iters=4, lr=0.5, warmup=0.25, log_freq=1, eval_freq=0, save_freq=0, workers=0, seed=0,
                device="cpu", root=str(tmp_path / "logs"), name="t", verbose="false", temperature=0.5)
    base.update(over)
    out = []
    for k, v in base.items():
        out += [f"--{k}", str(v)]
    return out


def run_cli(*args, env=None, timeout=600, cwd=REPO) -> subprocess.CompletedProcess:
    """Run ``python -m simclr ...`` in a subprocess (the way a user runs it)."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "simclr", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=cwd)
