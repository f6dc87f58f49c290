"""Run folders: one self-describing folder per run.

    <root>/<name>/<run-id>/
        config.yaml      the fully resolved config
        status.json      running | finished | failed | interrupted, pid, host, heartbeat, error
        env.json         package versions, device, git commit, command line
        metrics.jsonl    one JSON object per log/eval event ({"step": ..., "loss": ...})
        log.txt          everything the run printed
        checkpoints/     checkpoint-<step>.pt + .json model cards
        tb/              TensorBoard event files (``tensorboard --logdir <root>``)

Only the main process (rank 0) creates or writes a run folder.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .errors import UserError

HEARTBEAT_S = 30.0


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}"


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: str = "") -> dict:
    import numpy
    import torch
    import torchvision
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
           "numpy": numpy.__version__, "platform": platform.platform(), "host": socket.gethostname(),
           "device": device, "cuda": torch.version.cuda, "git_commit": _git_commit(),
           "command": " ".join(sys.argv), "cwd": os.getcwd()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus_visible"] = torch.cuda.device_count()
    return env


class RunDir:
    """A run folder and its writers (status, metrics, log, TensorBoard)."""

    def __init__(self, path: Path, tensorboard: bool = True):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write the run folder {self.path}: {e.strerror}. Choose a writable --root "
                            f"(or set SIMCLR_LOGS).") from None
        self._tb = None
        self._tb_enabled = tensorboard
        self._last_beat = 0.0
        self._status: dict = {}

    @classmethod
    def create(cls, root: str, name: str, run_dir: str = "") -> "RunDir":
        if run_dir:
            return cls(Path(run_dir))
        return cls(Path(root) / name / new_run_id())

    # --- status -------------------------------------------------------------------------
    def set_status(self, status: str, **extra) -> None:
        now = time.time()
        self._status.update({"status": status, "pid": os.getpid(), "host": socket.gethostname(),
                             "updated": now, **extra})
        self._status.setdefault("started", now)
        tmp = self.path / ".status.json.tmp"
        tmp.write_text(json.dumps(self._status, indent=2, default=str))
        os.replace(tmp, self.path / "status.json")
        self._last_beat = now

    def heartbeat(self, **extra) -> None:
        if time.time() - self._last_beat >= HEARTBEAT_S:
            self.set_status(self._status.get("status", "running"), **extra)

    # --- writers ------------------------------------------------------------------------
    def write_json(self, name: str, obj) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, self.path / name)

    def log_metrics(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self._tb_enabled:
            try:
                if self._tb is None:
                    from torch.utils.tensorboard import SummaryWriter
                    self._tb = SummaryWriter(str(self.path / "tb"))
                step = int(record.get("step", 0))
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self._tb.add_scalar(k, v, step)
            except ImportError:
                self._tb_enabled = False

    def log(self, msg: str) -> None:
        with open(self.path / "log.txt", "a") as f:
            f.write(msg + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: Path) -> list:
    """metrics.jsonl -> list of dicts; a half-written last line is ignored."""
    out = []
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def find_run_dir(ckpt: Path) -> Optional[Path]:
    """The run folder that holds ``ckpt`` (``<run>/checkpoints/x.pt``), if it is one."""
    p = Path(ckpt).resolve()
    if p.parent.name == "checkpoints" and (p.parent.parent / "config.yaml").exists():
        return p.parent.parent
    return None
