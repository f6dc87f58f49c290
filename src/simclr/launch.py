"""The spec's launch forms: one process per local GPU, started here.

``--dist ddp --world_size NODES --node_rank R --dist_address HOST:PORT`` on every node;
:func:`maybe_spawn` starts one process per local GPU (torch.multiprocessing), global rank =
R * GPUs_per_node + local rank, and gives each the torchrun variables that
:func:`simclr.distributed.init` reads. Without a GPU a node runs one process (gloo), in place.
``--dist dp`` (the spec's single-node multi-GPU mode, DataParallel there) is the same on one node:
one DDP process per visible GPU, DDP being the replacement PyTorch recommends for DataParallel.

The launcher is handed the function each process runs, so it knows nothing of the commands
above it; it creates those processes, which is why it (and not the library) sets their ranks
in the environment.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .distributed import check_batch, env_ranks
from .envvars import env_int, is_set
from .errors import UserError

# Processes per node in the spec's launch form; default: the number of visible GPUs (1 without GPUs).
PROCS_ENV = "SIMCLR_PROCS_PER_NODE"


def procs_per_node(device: str) -> int:
    if is_set(PROCS_ENV):
        return env_int(PROCS_ENV, 1)
    if device == "cpu" or not torch.cuda.is_available():
        return 1
    return torch.cuda.device_count()


def dp_note(cfg) -> str:
    """The ``note:`` line of a ``--dist dp`` run that is one process, saying why; '' for any other run."""
    if cfg.dist != "dp" or env_ranks() is not None or is_set(PROCS_ENV):
        return ""
    if cfg.device == "cpu":
        why = "--device cpu"
    elif not torch.cuda.is_available():
        why = "no GPU is visible"
    elif torch.cuda.device_count() == 1:
        why = "one GPU is visible"
    else:
        return ""
    return (f"note: --dist dp runs one training process per visible GPU of this node (DDP); {why}, so this run "
            f"is one process")


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--dist_address must be <address>:<port> of the main node, e.g. 10.0.0.1:29500; "
                        f"got {address!r}")
    return host.strip("[]"), int(port)


def maybe_spawn(cfg, argv: list, target: Callable[[list], None]) -> bool:
    """``--dist ddp`` / ``--dist dp`` spawn one process per local GPU, each running ``target(argv)``
    (a picklable top-level function: the processes are started with ``spawn``; it signals failure
    by raising or by ``sys.exit(code)``). Returns True when it spawned (this process then only
    waited for them). Under torchrun/SLURM, or with one process in all, it returns False and the
    caller trains. Checks the batch split first, so a bad value fails here and not inside a
    collective."""
    ranks = env_ranks()
    if ranks is not None:  # torchrun / SLURM gave the ranks
        check_batch(cfg.batch_size, ranks[1])
        return False
    if cfg.dist == "none":
        return False
    if cfg.dist == "dp" and (cfg.world_size != 1 or cfg.node_rank != 0):
        raise UserError(f"--dist dp runs on this node only (one process per visible GPU), but --world_size is "
                        f"{cfg.world_size} and --node_rank {cfg.node_rank}; for several nodes use --dist ddp "
                        f"--world_size NODES --node_rank R --dist_address HOST:PORT on each")
    if cfg.node_rank >= cfg.world_size:
        raise UserError(f"--node_rank {cfg.node_rank} must be below --world_size {cfg.world_size} "
                        f"(the number of nodes; ranks are 0 .. {cfg.world_size - 1})")
    if cfg.device.startswith("cuda:"):
        raise UserError(f"--device {cfg.device} pins one GPU, but --dist {cfg.dist} uses every visible GPU; "
                        f"use --device cuda and select GPUs with CUDA_VISIBLE_DEVICES")
    local = procs_per_node(cfg.device)
    world = cfg.world_size * local
    check_batch(cfg.batch_size, world)
    if world == 1:
        return False
    host, port = parse_address(cfg.dist_address)
    env = {"MASTER_ADDR": host, "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(local), "NODE_RANK": str(cfg.node_rank)}
    if local == 1:  # one process on this node: it is this one
        os.environ.update(env, RANK=str(cfg.node_rank), LOCAL_RANK="0")
        return False
    import torch.multiprocessing as mp
    try:
        mp.start_processes(_spawned, args=(target, env, cfg.node_rank, local, list(argv)), nprocs=local,
                           join=True, start_method="spawn")
    except mp.ProcessExitedException as e:
        rank = cfg.node_rank * local + e.error_index
        raise UserError(f"training process {e.error_index} of this node (rank {rank}) exited with code "
                        f"{e.exit_code}; see its message above. The others were stopped.") from None
    except mp.ProcessRaisedException as e:
        raise UserError(f"a training process of this node failed:\n{e}") from None
    return True


def _spawned(local_rank: int, target: Callable[[list], None], env: dict, node_rank: int, local: int,
             argv: list) -> None:
    """Body of one spawned process: its ranks in its environment, then the caller's function."""
    os.environ.update(env, RANK=str(node_rank * local + local_rank), LOCAL_RANK=str(local_rank))
    target(argv)
