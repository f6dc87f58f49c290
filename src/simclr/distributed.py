"""Process-group setup, the spec's multi-node launch, and small collective helpers, on torch.distributed alone.

Launch forms (all end in the same training code, one process per GPU):
  * the spec's: ``--dist ddp --world_size NODES --node_rank R --dist_address HOST:PORT`` on every
    node; :func:`maybe_spawn` starts one process per local GPU (torch.multiprocessing), global
    rank = R * GPUs_per_node + local rank. Without a GPU a node runs one process (gloo), in place.
  * torchrun / torch.distributed.run: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
  * SLURM (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (+ MASTER_ADDR/PORT you export);
  * nothing: a single process (no process group).
Backend: NCCL when training on CUDA, gloo on CPU.

Faults: every collective carries a timeout (``SIMCLR_DIST_TIMEOUT`` seconds, default 300). A
peer that dies closes its sockets, so the survivors usually fail at once; a peer that hangs
makes them fail after the timeout. Either way they stop with a one-line error (exit code 2)
and the last checkpoint, written atomically by rank 0, is untouched.
"""
from __future__ import annotations

import atexit
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError

# A dead peer makes the survivors fail at their next collective after this long instead of hanging.
DEFAULT_TIMEOUT_S = int(os.environ.get("SIMCLR_DIST_TIMEOUT", "300"))
# Processes per node in the spec's launch form; default: the number of visible GPUs (1 without GPUs).
PROCS_ENV = "SIMCLR_PROCS_PER_NODE"


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


def init(device_type: str, timeout_s: int | None = None) -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    ranks = env_ranks()
    if ranks is None or ranks[1] <= 1:
        return DistInfo()
    rank, world, local = ranks
    timeout_s = timeout_s or int(os.environ.get("SIMCLR_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        # torchrun --max-restarts relaunches the workers against the same store: without a prefix per
        # attempt, the new processes read the dead ones' addresses and fail to connect
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"simclr/attempt_{attempt}", store), rank=rank,
                                world_size=world, timeout=timeout)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"rank {rank} of {world} could not join the process group at "
                        f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s} s "
                        f"({str(e).splitlines()[0][:200]}); check that every node was started with the same "
                        f"address and world size and that the port is open") from None
    return DistInfo(rank, world, local)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized() and not _broken:
        dist.destroy_process_group()


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if not is_enabled():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


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


def check_same(value, what: str) -> None:
    """Fail on every rank when ranks disagree on ``value`` (e.g. the step a resume starts from)."""
    if not is_enabled():
        return
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise UserError(f"the processes disagree on {what}: {values} (by rank); with several nodes the run "
                        f"folder and checkpoints must be on storage that every node sees at the same path")


def gather_cat(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every rank's ``t`` (the same shape on every rank) concatenated along ``dim`` in rank order."""
    if not is_enabled():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim)


def gather_rows(t: torch.Tensor, sizes: list) -> torch.Tensor:
    """Every rank's rows concatenated, on every rank, when rank r holds sizes[r] of them
    (all_gather needs equal shapes: the shorter ranks pad and the padding is cut off)."""
    if not is_enabled():
        return t
    buf = t.new_zeros((max(sizes), *t.shape[1:]))
    buf[:t.shape[0]] = t
    parts = gather_cat(buf.unsqueeze(0))
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


# --------------------------------------------------------------------------------------------
# batch arithmetic and the spec's launch form
# --------------------------------------------------------------------------------------------
def check_batch(batch_size: int, processes: int) -> int:
    """Images per process; refuses a remainder before any process-group work can hang."""
    if batch_size % processes:
        lo = batch_size - batch_size % processes
        raise UserError(f"batch_size {batch_size} is not divisible by the number of processes {processes}; "
                        f"use a multiple of {processes}, e.g. --batch_size {lo or processes} or "
                        f"{lo + processes}")
    return batch_size // processes


def procs_per_node(device: str) -> int:
    if os.environ.get(PROCS_ENV):
        n = int(os.environ[PROCS_ENV])
        if n < 1:
            raise UserError(f"{PROCS_ENV}={n} must be >= 1")
        return n
    if device == "cpu" or not torch.cuda.is_available():
        return 1
    return torch.cuda.device_count()


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--dist_address must be <address>:<port> of the main node, e.g. 10.0.0.1:29500; "
                        f"got {address!r}")
    return host.strip("[]"), int(port)


def maybe_spawn(cfg, argv: list) -> bool:
    """The spec's launch form (``--dist ddp --world_size NODES --node_rank R``) spawns one process
    per local GPU; returns True when it did (this process then only waited for them).
    Under torchrun/SLURM, or with one process in all, it returns False and the caller trains.
    Checks the batch split first, so a bad value fails here and not inside a collective."""
    ranks = env_ranks()
    if ranks is not None:  # torchrun / SLURM gave the ranks
        check_batch(cfg.batch_size, ranks[1])
        return False
    if cfg.dist != "ddp":
        return False
    if cfg.node_rank >= cfg.world_size:
        raise UserError(f"--node_rank {cfg.node_rank} must be below --world_size {cfg.world_size} "
                        f"(the number of nodes; ranks are 0 .. {cfg.world_size - 1})")
    if cfg.device.startswith("cuda:"):
        raise UserError(f"--device {cfg.device} pins one GPU, but --dist ddp uses every visible GPU; "
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
        mp.start_processes(_spawned, args=(env, cfg.node_rank, local, list(argv)), nprocs=local,
                           join=True, start_method="spawn")
    except mp.ProcessExitedException as e:
        rank = cfg.node_rank * local + e.error_index
        raise UserError(f"training process {e.error_index} of this node (rank {rank}) exited with code "
                        f"{e.exit_code}; see its message above. The others were stopped.") from None
    except mp.ProcessRaisedException as e:
        raise UserError(f"a training process of this node failed:\n{e}") from None
    return True


def _spawned(local_rank: int, env: dict, node_rank: int, local: int, argv: list) -> None:
    """Body of one spawned process: the same CLI command, with the ranks in its environment."""
    os.environ.update(env, RANK=str(node_rank * local + local_rank), LOCAL_RANK=str(local_rank))
    from .cli import run_command
    code = run_command("pretrain", argv)
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        sys.exit(code)


# --------------------------------------------------------------------------------------------
# faults
# --------------------------------------------------------------------------------------------
_broken = False
_MARKERS = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout", "broken pipe",
            "processgroup", "process group", "peer")


def peer_failure(e: BaseException, rank: int, where: str = "") -> UserError | None:
    """A collective that failed because another process died or hung -> a clear error, else None.

    After such a failure the process group is unusable, and tearing it down (or letting the
    interpreter do it at exit) can hang or abort; so we skip the teardown and leave with
    ``os._exit`` once the error has been printed."""
    global _broken
    if not is_enabled() or not isinstance(e, RuntimeError):
        return None
    msg = str(e)
    if not (isinstance(e, dist.DistError) or any(m in msg.lower() for m in _MARKERS)):
        return None
    _broken = True
    atexit.register(_hard_exit)
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return UserError(f"rank {rank}: another training process stopped or stopped responding "
                     f"(timeout {int(os.environ.get('SIMCLR_DIST_TIMEOUT', DEFAULT_TIMEOUT_S))} s): {first[:300]}. "
                     f"The last checkpoint is intact{where}; resume with --resume auto --run_dir <run folder>")


def _hard_exit() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)
