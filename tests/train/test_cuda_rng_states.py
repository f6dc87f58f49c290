"""CUDA generator states in checkpoints: one per rank, each for the rank's own device, restored only there.

No GPU here: ``torch.cuda`` is mocked with a number of visible devices, generator states that name the process
and device they came from, and a ``set_rng_state`` that fails (like the real one) for a device that does not exist.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.cuda.random

from simclr import distributed, runtime
from simclr.train import resume


@pytest.fixture
def gpus(monkeypatch):
    """Mocked CUDA with ``gpus.count`` visible devices; ``gpus.set`` lists (state, device index) restored."""
    box = SimpleNamespace(count=4, set=[], rank=0)

    def get_rng_state(device="cuda"):
        index = torch.device(device).index or 0
        assert index < box.count
        return torch.tensor([box.rank, index], dtype=torch.uint8)  # "rank r's process, device i"

    def set_rng_state(state, device="cuda"):
        index = torch.device(device).index if isinstance(device, (str, torch.device)) else int(device)
        if (index or 0) >= box.count:
            raise IndexError(f"device {index} of {box.count}")
        box.set.append((state.tolist(), index or 0))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: box.count)
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what set_rng_state_all calls
    return box


def _saved_by(gpus, world: int) -> dict:
    """The RNG state a run of ``world`` processes (rank r on cuda:r) writes: every rank's own device's state."""
    per_rank = []
    for r in range(world):
        gpus.rank = r
        per_rank.append(runtime.cuda_rng_state(torch.device(f"cuda:{r}")))
    gpus.rank = 0
    return runtime.rng_state(per_rank)


def test_resume_on_fewer_gpus_restores_each_rank_its_own_state(gpus):
    state = _saved_by(gpus, world=4)
    assert [t.tolist() for t in state["cuda_by_rank"]] == [[r, r] for r in range(4)]
    gpus.count = 2  # resumed with 2 processes on a 2-GPU machine
    for rank in range(2):
        assert runtime.set_rng_state(state, torch.device(f"cuda:{rank}"), rank) == ""
    assert gpus.set == [([0, 0], 0), ([1, 1], 1)]  # rank r gets rank r's saved state, on its own device only


def test_a_rank_the_checkpoint_has_no_state_for_keeps_its_seed_with_a_note(gpus):
    state = _saved_by(gpus, world=1)
    gpus.count = 2
    note = runtime.set_rng_state(state, torch.device("cuda:1"), rank=1)
    assert "no CUDA generator state for rank 1" in note and gpus.set == []


def test_older_checkpoints_restore_only_the_device_of_rank_0(gpus):
    legacy = runtime.rng_state()
    legacy["cuda"] = [torch.tensor([0, i], dtype=torch.uint8) for i in range(4)]  # get_rng_state_all() of 4 GPUs
    gpus.count = 1
    runtime.set_rng_state(legacy, torch.device("cuda:0"), rank=0)
    assert gpus.set == [([0, 0], 0)]


def test_cpu_processes_save_and_restore_no_cuda_state(gpus):
    state = runtime.rng_state([runtime.cuda_rng_state(torch.device("cpu"))])
    assert "cuda_by_rank" not in state and "cuda" not in state
    runtime.set_rng_state(_saved_by(gpus, world=2), torch.device("cpu"), rank=0)
    assert gpus.set == []


def test_every_rank_joins_the_gather_before_only_rank_0_writes(gpus, monkeypatch):
    """resume.save gathers the states on every rank (a collective: a rank that skipped it would hang the
    others), then returns on ranks without a run folder."""
    calls = []
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: calls.append(obj) or [obj])
    gpus.rank = 1
    s = SimpleNamespace(cfg=None, parts=SimpleNamespace(device=torch.device("cuda:1")), state=None, run=None)
    assert resume.save(s) is None
    assert [c.tolist() for c in calls] == [[1, 1]]
