"""Process-group setup and teardown, and the few collectives the package uses, on torch.distributed alone.

Where the ranks come from (all end in the same training code, one process per GPU):
  * torchrun / torch.distributed.run: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
  * SLURM (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (+ MASTER_ADDR/PORT you export);
  * the spec's ``--dist ddp --world_size NODES ...`` form: :mod:`simclr.launch` starts the
    processes and hands them the torchrun variables;
  * nothing: a single process (no process group).
Backend: NCCL when training on CUDA, gloo on CPU.

Faults: every collective carries a timeout (``SIMCLR_DIST_TIMEOUT`` seconds, default 300). A
peer that dies closes its sockets, so the survivors usually fail at once; a peer that hangs
makes them fail after the timeout. Either way :func:`peer_failure` turns the error into one
line, and :func:`is_broken` tells the entry point to leave without tearing the group down.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .envvars import env_int, is_set
from .errors import ConfigError, UserError

# A dead peer makes the survivors fail at their next collective after this long instead of hanging
# (SIMCLR_DIST_TIMEOUT overrides it; read when a process group starts, see collective_timeout_s()).
DEFAULT_TIMEOUT_S = 300


def collective_timeout_s() -> int:
    return env_int("SIMCLR_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)


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
    """(rank, world size, local rank) that a launcher (torchrun, the spec's form, srun) put in the environment;
    None for a single process. Each value is checked where it enters (one line naming the variable)."""
    if is_set("WORLD_SIZE") and is_set("RANK"):
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif is_set("SLURM_PROCID") and is_set("SLURM_NTASKS") and env_int("SLURM_NTASKS", 1) > 1:
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    else:
        return None
    rank, world, local = env_int(names[0], 0), env_int(names[1], 1), env_int(names[2], 0)
    if rank >= world:
        raise ConfigError(f"environment variables {names[0]}={rank} and {names[1]}={world}: a rank must be below "
                          f"the world size; check the launcher's settings")
    return rank, world, local


def _reach(addr: str, port: int, timeout_s: float) -> None:
    """Raise OSError unless rank 0's store at ``addr:port`` accepts a TCP connection within ``timeout_s``: a host
    name that does not resolve fails at once; a refused connection (rank 0 not started yet) is tried again until
    the time is up. torch's own client says all this in C++ stack frames."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
            with socket.create_connection((addr, port), timeout=max(0.05, min(left, 5.0))):
                return
        except socket.gaierror as e:  # a name that does not exist fails at once; a resolver not answering, later
            if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)) or left <= 0:
                raise
        except (ConnectionRefusedError, TimeoutError):  # other errors (no route to host ...) at once
            if left <= 0:
                raise
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def _cause(e: BaseException, addr: str, port: int) -> str:
    """What went wrong connecting to ``addr:port``, and the fix, from the exception (Python's or torch's)."""
    text = str(e)
    low = text.lower()
    if isinstance(e, socket.gaierror) or "name or service not known" in low or "nodename nor servname" in low:
        why = e.strerror if isinstance(e, socket.gaierror) and e.strerror else "name or service not known"
        return (f"host not found: MASTER_ADDR={addr} does not resolve ({why}); set MASTER_ADDR to the host name or "
                f"address of rank 0's node")
    if isinstance(e, ConnectionRefusedError) or "connection refused" in low:
        return (f"connection refused: nothing listens at {addr}:{port} (rank 0 not started, or another "
                f"MASTER_ADDR/MASTER_PORT there); start rank 0 with the same MASTER_ADDR and MASTER_PORT")
    if "ping failed" in low or "invalid value returned from server" in low:
        return (f"{addr}:{port} answers, but is no process group's store (another service listens on MASTER_PORT); "
                f"choose a free MASTER_PORT for every rank")
    if "address already in use" in low:
        return f"MASTER_PORT {port} is already in use on this host; choose another MASTER_PORT"
    if isinstance(e, (TimeoutError, socket.timeout)) or "timed out" in low:
        return (f"timed out connecting to {addr}:{port} (no answer: a wrong address, or a firewall); check "
                f"MASTER_ADDR and that the port is open between the nodes")
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} connecting to {addr}:{port}; check MASTER_ADDR and MASTER_PORT"
    return (f"{text.splitlines()[0][:200] if text else type(e).__name__}; check that every node was started with "
            f"the same address and world size and that the port is open")


_NOISE = ("[c10d]", "frame #", "Exception raised from", "<omitting python frames>")


@contextlib.contextmanager
def _without_c10d_noise():
    """Leave out what torch's C++ client writes to the standard error while it retries (each retry a warning
    with 15-30 C++ stack frames): the failure is said in one line afterwards. Other lines written meanwhile are
    passed on."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [ln for ln in caught.read().decode(errors="replace").splitlines()
                    if ln.strip() and not any(n in ln for n in _NOISE)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def _rendezvous(url: str, rank: int, world: int, timeout: datetime.timedelta):
    """The TCP store of ``url`` within ``timeout``. torch's client waits forever for the handshake of a port
    that accepts and never answers (another service on MASTER_PORT), whatever timeout it is given: the
    connection runs in a daemon thread, and a store that has not answered in time is an error."""
    out: list = []

    def connect():
        try:
            out.append(next(dist.rendezvous(url, rank, world, timeout=timeout))[0])
        except Exception as e:  # handed to the caller's thread
            out.append(e)

    t = threading.Thread(target=connect, daemon=True, name="simclr-rendezvous")
    with _without_c10d_noise():
        t.start()
        t.join(timeout.total_seconds() + 5)
    if not out:
        raise RuntimeError(f"no answer from the store at {url} (is MASTER_PORT another service?)")
    if isinstance(out[0], Exception):
        raise out[0]
    return out[0]


def init(device_type: str, timeout_s: int | None = None) -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), env_int("LOCAL_RANK", 0))
    ranks = env_ranks()
    if ranks is None or ranks[1] <= 1:
        return DistInfo()
    rank, world, local = ranks
    timeout_s = timeout_s or collective_timeout_s()
    # into the rendezvous URL, not os.environ: the environment belongs to whoever started the process
    addr, port = os.environ.get("MASTER_ADDR", "").strip() or "127.0.0.1", env_int("MASTER_PORT", 29500)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        # rank 0 opens the store; the others first reach it from Python, so that a wrong MASTER_ADDR or a port no
        # one listens on is one line naming the cause (host not found, refused, timed out)
        _reach(addr, port, timeout_s) if rank else socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise UserError(f"rank {rank} of {world} could not reach the process group's store at {addr}:{port} within "
                        f"{timeout_s} s: {_cause(e, addr, port)}") from None
    try:
        host = f"[{addr}]" if ":" in addr else addr  # an IPv6 address needs brackets in a URL
        store = _rendezvous(f"tcp://{host}:{port}", rank, world, timeout)
        # torchrun --max-restarts relaunches the workers against the same store: without a prefix per
        # attempt, the new processes read the dead ones' addresses and fail to connect
        attempt = env_int("TORCHELASTIC_RESTART_COUNT", 0)
        dist.init_process_group(backend, store=dist.PrefixStore(f"simclr/attempt_{attempt}", store), rank=rank,
                                world_size=world, timeout=timeout)
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"rank {rank} of {world} could not join the process group at {addr}:{port} within "
                        f"{timeout_s} s: {_cause(e, addr, port)}") from None
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


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` without a process group). A collective."""
    if not is_enabled():
        return [obj]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, obj)
    return values


def check_same(value, what: str) -> None:
    """Fail on every rank when ranks disagree on ``value`` (e.g. the step a resume starts from)."""
    if not is_enabled():
        return
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise UserError(f"the processes disagree on {what}: {values} (by rank); with several nodes the run "
                        f"folder and checkpoints must be on storage that every node sees at the same path")


def check_same_config(values: dict, what: str = "the resolved config") -> None:
    """Fail on every rank, naming the differing keys, unless all ranks hold the same ``values`` (a typo in one
    node's command line would otherwise train "successfully" with rank 0's values recorded). A collective."""
    if not is_enabled():
        return
    digest = hashlib.sha256(repr(sorted(values.items())).encode()).hexdigest()
    digests = all_gather_object(digest)
    if len(set(digests)) == 1:
        return
    every = all_gather_object(values)
    keys = sorted({k for v in every for k in v if len({repr(other.get(k)) for other in every}) > 1})
    shown = "; ".join(f"{k}: " + ", ".join(f"rank {r} {v.get(k)!r}" for r, v in enumerate(every)) for k in keys[:5])
    raise UserError(f"the processes disagree on {what}: {shown}; start every process with the same options")


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


def check_batch(batch_size: int, processes: int) -> int:
    """Images per process; refuses a remainder before any process-group work can hang."""
    if batch_size % processes:
        lo = batch_size - batch_size % processes
        raise UserError(f"batch_size {batch_size} is not divisible by the number of processes {processes}; "
                        f"use a multiple of {processes}, e.g. --batch_size {lo or processes} or "
                        f"{lo + processes}")
    return batch_size // processes


# --------------------------------------------------------------------------------------------
# faults
# --------------------------------------------------------------------------------------------
_broken = False
_MARKERS = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout", "broken pipe",
            "processgroup", "process group", "peer")


def peer_failure(e: BaseException, rank: int, where: str = "") -> UserError | None:
    """A collective that failed because another process died or hung -> a clear error, else None.

    After such a failure the process group is unusable: :func:`cleanup` then skips the teardown,
    and :func:`is_broken` says so to the entry point, which should leave without the interpreter's
    own teardown (it can hang or abort in the dead group) once the error is printed."""
    global _broken
    if not is_enabled() or not isinstance(e, RuntimeError):
        return None
    msg = str(e)
    if not (isinstance(e, dist.DistError) or any(m in msg.lower() for m in _MARKERS)):
        return None
    _broken = True
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return UserError(f"rank {rank}: another training process stopped or stopped responding "
                     f"(timeout {collective_timeout_s()} s): {first[:300]}. "
                     f"The last checkpoint is intact{where}; resume with --resume auto --run_dir <run folder>")


def is_broken() -> bool:
    """Whether :func:`peer_failure` found the process group dead in this process."""
    return _broken
