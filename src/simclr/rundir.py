"""The run-folder writer: one self-describing folder per run, written by training and evaluation.

    <root>/<name>/<run-id>/
        config.yaml      the fully resolved config
        status.json      running | finished | failed | interrupted, pid, host, heartbeat, error
        env.json         package versions, device, git commit, command line (of the last invocation)
        invocations.jsonl  the same, one line per invocation (a resumed run has several)
        metrics.jsonl    one JSON object per log/eval event ({"step": ..., "loss": ...})
        log.txt          everything the run printed
        checkpoints/     checkpoint-<step>.pt + .json model cards
        tb/              TensorBoard event files (``tensorboard --logdir <root>``)
        wandb/, mlruns/, trackers.json   other trackers (--logger; :mod:`simclr.trackers`)
        eval*.json       results of evaluation runs (protocol, top-1, top-5, per-class accuracy ...)

Only the main process (rank 0) creates or writes a run folder. While a run is ``running`` a
background thread rewrites ``status.json`` every ``HEARTBEAT_S`` seconds (also during long
evaluations), so a run killed without warning is recognised by the index (:mod:`simclr.runs`)
as ``interrupted``: its process is gone (same host) or its heartbeat is stale (any host).

Whole files (status.json, env.json, eval.json) are replaced atomically with
:func:`simclr.files.atomic_write`; metrics.jsonl and log.txt only ever grow by appended lines
(a reader skips a half-written last line).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import socket
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from .errors import UserError
from .files import append_line, atomic_write, check_own, git_state, is_temp, open_own, read_small_json
from .locks import BUSY, try_lock
from .trackers import Trackers

HEARTBEAT_S = 30.0
MAX_NAME_PARTS = 15  # --name a/b/c: nested folders, each listed by `simclr runs` (which looks this deep)


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}"


def environment(device: str = "") -> dict:
    from .data.datasets import data_root
    from .runtime import cpu_allocator
    import numpy
    import torch
    import torchvision
    git = git_state()  # git_dirty: whether the code that ran differs from git_commit (None: not a checkout)
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
           "numpy": numpy.__version__, "platform": platform.platform(), "host": socket.gethostname(),
           "device": device, "cuda": torch.version.cuda, "git_commit": git.commit, "git_dirty": git.dirty,
           "command": " ".join(sys.argv), "cwd": os.getcwd(),
           "data_root": str(data_root().resolve()),
           "imagenet_path": os.environ.get("IMAGENET_PATH", ""), "cpu_allocator": cpu_allocator()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus_visible"] = torch.cuda.device_count()
    return env


def find_run_dir(ckpt: Path) -> Optional[Path]:
    """The run folder that holds ``ckpt`` (``<run>/checkpoints/x.pt``), if it is one."""
    p = Path(ckpt).resolve()
    if p.parent.name == "checkpoints" and (p.parent.parent / "config.yaml").exists():
        return p.parent.parent
    return None


# --- what a run folder is ------------------------------------------------------------------------
# The files and folders a run writes or reads at the top of its folder; each must be a regular file (or
# folder) of its own, never a symlink or a special file (checked with lstat, opened with O_NOFOLLOW).
RUN_FILES = (".lock", "status.json", "config.yaml", "env.json", "invocations.jsonl", "metrics.jsonl", "log.txt",
             "config_history.jsonl", "eval.json", "trackers.json")
RUN_FOLDERS = ("checkpoints", "tb", "wandb", "mlruns")
KINDS = ("pretrain", "eval", "knn")


def check_run_folder(path: Path) -> None:
    """Refuse (one :class:`UserError` line) a run folder that is a symlink, or that holds a symlink or special
    file where the run writes or reads: a link would make the run lock, append to, train from, overwrite or prune
    files outside it."""
    path = Path(path)
    check_own(path, folder=True)
    for name in RUN_FILES:
        check_own(path / name)
    for name in RUN_FOLDERS:
        check_own(path / name, folder=True)
    ckpts = path / "checkpoints"
    if ckpts.is_dir():
        for p in ckpts.iterdir():
            if p.suffix in (".pt", ".json"):
                check_own(p)


def is_run(path: Path) -> bool:
    """Whether ``path`` is a run folder: it holds the config.yaml or status.json a run writes first."""
    path = Path(path)
    return path.is_dir() and any(os.path.lexists(path / n) for n in ("config.yaml", "status.json"))


def folder_kind(path: Path) -> str:
    """What wrote the run folder ``path``: 'pretrain', 'eval' or 'knn' (recorded in status.json; a folder written
    before kinds were recorded is judged by its files), '' when it is no run folder."""
    path = Path(path)
    if not is_run(path):
        return ""
    status = _read_small_json(path / "status.json")
    if isinstance(status, dict) and status.get("kind") in KINDS:
        return status["kind"]
    protocol = status.get("protocol") if isinstance(status, dict) else None
    if protocol is not None or os.path.lexists(path / "eval.json"):
        return "knn" if protocol == "knn" else "eval"
    return "pretrain"


def newest_run(folder: Path, kind: str = "pretrain") -> Optional[Path]:
    """The most recently started run folder of ``kind`` directly under ``folder`` (None when there is none)."""
    runs = [p for p in folder.iterdir() if folder_kind(p) == kind] if Path(folder).is_dir() else []
    return max(runs, key=_started, default=None)


def _started(run: Path) -> float:
    status = _read_small_json(run / "status.json")
    started = status.get("started") if isinstance(status, dict) else None
    if isinstance(started, (int, float)) and not isinstance(started, bool) and math.isfinite(started):
        return float(started)
    try:
        return (run / "config.yaml").stat().st_mtime
    except OSError:
        return 0.0


MAX_RUN_JSON = 1 << 20


def _read_small_json(path: Path):
    """A run-folder JSON file (at most MAX_RUN_JSON bytes, never through a symlink), or None."""
    return read_small_json(path, MAX_RUN_JSON)


def check_kind(path: Path, kind: str) -> None:
    """Refuse to write a run of ``kind`` into ``path`` when another kind of run lives there already, or files
    that are no run's (:func:`check_not_foreign`)."""
    found = folder_kind(path)
    if found and found != kind:
        raise UserError(f"{path} is a {found} run folder; this {kind} run would overwrite its config.yaml and "
                        f"status.json. Give another --run_dir (or none: a new folder is made)")
    check_not_foreign(path)


def check_not_foreign(path: Path) -> None:
    """Refuse to make a run of an existing folder that is no run when the run would harm what is there: a file it
    would write over or append to that it did not write (a foreign config.yaml, env.json, log.txt, metrics.jsonl,
    a non-empty checkpoints/), or run folders (``simclr runs`` would list this run and no longer the runs below
    it). Anything else may stay: a console log (``> R/stdout.log``, SLURM's ``--output=R/slurm-%j.out``), notes,
    the empty folders or lock a run killed before its config.yaml left."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink() or is_run(path):
        return
    harmed, runs = [], []
    for name in sorted(os.listdir(path)):
        p = path / name
        if is_temp(p) or name == ".lock" and _our_lock(p):
            continue
        if name in RUN_FILES or name == "checkpoints" and (not p.is_dir() or any(os.scandir(p))):
            harmed.append(name)
        elif name not in RUN_FOLDERS and p.is_dir() and not p.is_symlink() and _holds_runs(p):
            runs.append(name)
    if harmed:
        more = f" and {len(harmed) - 1} more" if len(harmed) > 1 else ""
        raise UserError(f"{path} is no run folder and holds {harmed[0]}{more}, which a run would write over or "
                        f"append to but did not write. Give a new or empty --run_dir (or none: a new folder is made "
                        f"under --root)")
    if runs:
        raise UserError(f"{path} holds run folders ({runs[0]}); a run made there would hide them from `simclr runs`. "
                        f"Give a new or empty --run_dir (or none: a new folder is made under --root)")


def _our_lock(path: Path) -> bool:
    """Whether ``path`` is a run's .lock (empty, or the holder a run writes into it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        data = os.read(fd, 200) if stat.S_ISREG(os.fstat(fd).st_mode) else b"?"
    except OSError:
        data = b"?"
    finally:
        os.close(fd)
    return not data.strip() or data.startswith(b"pid ")


def _holds_runs(folder: Path) -> bool:
    """Whether ``folder`` is a run folder, or holds one a level below (a name folder of runs)."""
    if is_run(folder):
        return True
    try:
        return any(e.is_dir(follow_symlinks=False) and is_run(Path(e.path)) for e in os.scandir(folder))
    except OSError:
        return False


def _within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or below it (links resolved: a link into the data is inside it)."""
    p, f = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return p == f or f in p.parents


def _json_text(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


def _take_lock(folder: Path) -> int:
    """One writer per run folder: an exclusive ``flock`` on ``<run>/.lock``, held until :meth:`RunDir.close`
    or the process ends (so a dead writer's lock is free again by itself). The holder's pid and host are
    written into the file for the message a second writer gets. Where the file system keeps no locks (Lustre
    mounted ``noflock``) the run goes on without one, after one warning (:mod:`simclr.locks`)."""
    fd = open_own(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        got = try_lock(fd, folder / ".lock", exclusive=True)
    except OSError as e:
        os.close(fd)
        raise UserError(f"cannot lock the run folder {folder} ({folder / '.lock'}: {e.strerror}); give this run "
                        f"another --run_dir") from None
    if got == BUSY:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"the run folder {folder} is in use by {holder}; wait for that run to end, or give this "
                        f"one another --run_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode(), 0)
    return fd


_HELD: dict = {}  # run folder (real path) -> its lock's descriptor, taken by hold_lock() before the RunDir


def hold_lock(folder: Path) -> None:
    """Take the lock of the existing run folder ``folder`` now, before the work that decides where the run goes on
    from (choosing and reading the checkpoint to resume, the data scan): a second process on the folder is refused
    at once, never after minutes of set-up, and never continues from a checkpoint the holder is about to supersede.
    The folder's :class:`RunDir` takes the lock over; :func:`release_held` lets go of one no RunDir took."""
    key = os.path.realpath(folder)
    if key in _HELD or not Path(folder).is_dir():
        return
    check_run_folder(Path(folder))
    _HELD[key] = _take_lock(Path(folder))


def release_held() -> None:
    """Release the locks :func:`hold_lock` took that no :class:`RunDir` took over (a set-up that failed)."""
    while _HELD:
        os.close(_HELD.popitem()[1])


class RunDir:
    """A run folder and its writers (status, metrics, log) and trackers (TensorBoard unless told otherwise)."""

    def __init__(self, path: Path, tensorboard: bool = True, kind: str = "pretrain"):
        self.path = Path(path)
        self.kind = kind
        check_run_folder(self.path)
        check_kind(self.path, kind)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path):  # fail now, not at the first checkpoint
                pass
        except OSError as e:
            raise UserError(f"cannot write the run folder {self.path}: {e.strerror}. Choose a writable --root "
                            f"(or set SIMCLR_LOGS).") from None
        held = _HELD.pop(os.path.realpath(self.path), None)  # hold_lock() took it before the set-up
        self._lock_fd = held if held is not None else _take_lock(self.path)
        self.trackers = Trackers(self.path, "tensorboard" if tensorboard else "none")
        self._last_beat = 0.0
        self._status: dict = self._earlier_invocations()
        self._began = time.time()
        self._lock = threading.Lock()
        self._beat_stop: Optional[threading.Event] = None

    @classmethod
    def create(cls, root: str, name: str, run_dir: str = "", kind: str = "pretrain",
               data: Optional[Path] = None) -> "RunDir":
        """The run folder ``run_dir``, or a new ``root/name/<id>``; never inside ``data``, the folder the run's
        images are read from (its files would be scanned as a class of images next time)."""
        target = Path(run_dir) if run_dir else Path(root) / name
        if data is not None and _within(target, Path(data)):
            option = "--run_dir" if run_dir else "--root"
            raise UserError(f"the run folder {target} would lie inside the data folder {data}: the next scan would "
                            f"read the run's files as images of a class. Choose {option} outside it")
        if run_dir:
            return cls(Path(run_dir), kind=kind)
        if len(Path(name).parts) > MAX_NAME_PARTS:
            raise UserError(f"--name {name} has {len(Path(name).parts)} parts; a run name may nest at most "
                            f"{MAX_NAME_PARTS} folders (a/b/c), so that `simclr runs` lists it")
        base, run_id = Path(root) / name, new_run_id()
        for i in range(1000):  # two runs started in the same second by one process get their own folders
            path = base / (run_id if i == 0 else f"{run_id}-{i}")
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                continue
            except OSError:
                break  # not writable: the constructor says so in one line
        return cls(path, kind=kind)

    # --- status -------------------------------------------------------------------------
    def set_status(self, status: str, **extra) -> None:
        with self._lock:
            now = time.time()
            self._status.update({"status": status, "kind": self.kind, "pid": os.getpid(),
                                 "host": socket.gethostname(), "updated": now, **extra})
            self._status.setdefault("started", now)
            self._status["train_s"] = round(self._before_s + now - self._began, 3)
            self._write_status()
        if status == "running":
            self._start_beating()
        else:
            self._stop_beating()

    def _earlier_invocations(self) -> dict:
        """A resumed run keeps its first start time and adds this invocation's time to the earlier ones'
        (``train_s``), so the index shows the whole run, not only its last piece."""
        self._before_s = 0.0
        old = _read_small_json(self.path / "status.json")
        if not isinstance(old, dict) or not isinstance(old.get("started"), (int, float)):
            return {}
        before = old.get("train_s")
        # written before train_s existed: its last invocation's span
        if not isinstance(before, (int, float)) or isinstance(before, bool):
            updated = old.get("updated")
            before = updated - old["started"] if isinstance(updated, (int, float)) else 0.0
        self._before_s = max(0.0, float(before)) if math.isfinite(before) else 0.0
        return {"started": old["started"]}

    def _write_status(self) -> None:
        # caller holds self._lock; atomic_write picks a unique temporary name, so the heartbeat thread and
        # the loop never share one
        atomic_write(self.path / "status.json", _json_text(self._status))
        self._last_beat = self._status["updated"]

    def heartbeat(self, **extra) -> None:
        if time.time() - self._last_beat >= HEARTBEAT_S:
            self.set_status(self._status.get("status", "running"), **extra)

    def _start_beating(self) -> None:
        """Refresh ``updated`` every HEARTBEAT_S from a daemon thread while the status is running.

        A thread (not the training loop) beats so that a long evaluation or a slow first step is
        not mistaken for a dead run; it dies with the process, which is exactly the signal wanted.
        """
        if self._beat_stop is not None:
            return
        stop = self._beat_stop = threading.Event()

        def beat():
            while not stop.wait(HEARTBEAT_S):
                with self._lock:
                    if stop.is_set() or self._status.get("status") != "running":
                        return
                    self._status["updated"] = time.time()
                    self._status["train_s"] = round(self._before_s + self._status["updated"] - self._began, 3)
                    try:
                        self._write_status()
                    except (OSError, UserError):  # a full or vanished disk must not kill training from a side thread
                        pass

        threading.Thread(target=beat, name="simclr-heartbeat", daemon=True).start()

    def _stop_beating(self) -> None:
        if self._beat_stop is not None:
            self._beat_stop.set()
            self._beat_stop = None

    # --- trackers -------------------------------------------------------------------------
    def track(self, logger: str, config: dict, project: str, mlflow_uri: str = "") -> None:
        """Feed the trackers ``logger`` names (:mod:`simclr.trackers`) from now on: the config now, then every
        metrics line; the run's final status when it is closed."""
        self.trackers.finish("finished")
        self.trackers = Trackers(self.path, logger, config, project, mlflow_uri)

    # --- writers ------------------------------------------------------------------------
    def write_json(self, name: str, obj) -> None:
        atomic_write(self.path / name, _json_text(obj))

    def record_environment(self, env: dict) -> None:
        """env.json (this invocation's) and one more line of invocations.jsonl (every invocation: a resumed run
        has several, each with its own command, host and commit)."""
        self.write_json("env.json", env)
        append_line(self.path / "invocations.jsonl", json.dumps(dict(env, time=time.time()), default=str) + "\n")

    def log_metrics(self, record: dict) -> None:
        # strict JSON: a non-finite value (the loss of a step skipped by --on_nan skip) is written as null
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        # an append: readers skip a half-written last line
        append_line(self.path / "metrics.jsonl", json.dumps(clean, default=float, allow_nan=False) + "\n")
        self.trackers.log(clean, int(record.get("step", 0)))

    def close(self) -> None:
        self._stop_beating()
        self.trackers.finish(str(self._status.get("status", "finished")))
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None
