"""Checkpoints: atomic save, checksum, safe load.

Our format (a dict saved with ``torch.save``):
    format="simclr", format_version, kind ("pretrain" | "linear" ...), step, config (plain dict),
    model (unwrapped state dict: no ``module.``/``_orig_mod.`` prefixes), optimizer, scaler,
    rng, metrics.
Beside every checkpoint ``X.pt`` lies ``X.json``: its SHA-256, size, step and a short
model card (architecture, data, metrics). Loading verifies the checksum when the card is
there, and always loads with ``weights_only=True`` (no arbitrary code from pickles).
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import CheckpointError, UserError

FORMAT = "simclr"
FORMAT_VERSION = 1
CKPT_RE = re.compile(r"checkpoint-(\d+)\.pt$")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def unwrap_state_dict(sd: dict) -> dict:
    """Drop DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix) or f".{prefix}" in k:
                k = k[len(prefix):] if k.startswith(prefix) else k.replace(f".{prefix}", ".")
        out[k] = v
    return out


def save_checkpoint(path: Path, payload: dict, card: Optional[dict] = None) -> str:
    """Write ``payload`` to ``path`` atomically (temp file in the same folder, fsync, rename) and
    its model card ``path.with_suffix('.json')`` with the SHA-256. Returns the checksum.

    If anything fails (disk full ...), the temp file is removed and an existing file at
    ``path`` — and every other checkpoint — is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    payload.setdefault("format", FORMAT)
    payload.setdefault("format_version", FORMAT_VERSION)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        meta = {"file": path.name, "sha256": digest, "bytes": tmp.stat().st_size, "step": payload.get("step"),
                "format": FORMAT, "format_version": FORMAT_VERSION, **(card or {})}
        # card first: a crash between the two renames leaves a card whose checksum does not match
        # the (older) file, which the loader then treats as corrupt and skips — never the reverse.
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=2, default=str).encode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise UserError(f"disk full while saving {path}; the previous checkpoints are intact. "
                            f"Free space and resume with --resume auto.") from None
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise UserError(f"cannot write checkpoint {path}: {e.strerror}. Choose a writable --root.") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def verify_checksum(path: Path) -> None:
    card = Path(path).with_suffix(".json")
    if not card.exists():
        return
    try:
        meta = json.loads(card.read_text())
    except (OSError, ValueError):
        return
    want = meta.get("sha256")
    if want and sha256_file(path) != want:
        raise CheckpointError(f"checkpoint {path} does not match the checksum in {card.name}: the file is "
                              f"truncated or corrupt")


def load_checkpoint(path, map_location="cpu", verify: bool = True, trust: bool = False) -> dict:
    """Load any checkpoint safely (``weights_only=True``; ``argparse.Namespace`` allowed for the spec's
    files). ``trust=True`` (the user's explicit ``--trust_checkpoint``) permits full unpickling."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if verify:
        verify_checksum(path)
    try:
        if trust:
            warnings.warn(f"loading {path} with full unpickling (--trust_checkpoint): only do this for files "
                          f"you trust", stacklevel=2)
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message always mentions weights_only; only a GLOBAL the safe unpickler blocked means the
        # file needs code to load; anything else (bad load key ...) is a corrupt or non-PyTorch file
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        msg = next((ln for ln in lines if "GLOBAL" in ln), lines[-1] if lines else type(e).__name__)
        if "GLOBAL" in msg:
            raise CheckpointError(f"refusing to load {path}: it needs code beyond tensors and plain data to "
                                  f"unpickle ({msg[:200]}). If you trust its source, pass "
                                  f"--trust_checkpoint true.") from None
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupt or not a PyTorch "
                              f"file)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError, KeyError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupt or not a PyTorch "
                              f"file): {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"checkpoint-{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list:
    """Checkpoints of a run folder, newest (highest step) first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_RE.search(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_valid(run_dir: Path, log=print) -> Optional[Path]:
    """The newest checkpoint that passes its checksum and loads; corrupt ones are skipped with a warning."""
    for p in list_checkpoints(run_dir):
        try:
            verify_checksum(p)
            load_checkpoint(p, verify=False)
            return p
        except CheckpointError as e:
            log(f"warning: skipping {p.name}: {e}")
    return None


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints; also remove what a killed save left behind (temp files,
    a card whose checkpoint never got renamed into place). Only the one process that writes the run
    folder calls this, right after a complete save, so no temp file here belongs to a save in progress."""
    for p in list_checkpoints(run_dir)[keep_last:]:
        p.unlink(missing_ok=True)
        p.with_suffix(".json").unlink(missing_ok=True)
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.startswith(".checkpoint-") and ".tmp" in p.name:
            p.unlink(missing_ok=True)
        elif p.suffix == ".json" and p.name.startswith("checkpoint-") and not p.with_suffix(".pt").exists():
            p.unlink(missing_ok=True)


def model_state(model: torch.nn.Module) -> dict:
    m = model.module if hasattr(model, "module") else model
    return unwrap_state_dict(m.state_dict())


def describe(ckpt: Any) -> str:
    if isinstance(ckpt, dict):
        return f"dict with keys {sorted(map(str, ckpt))[:8]}"
    return type(ckpt).__name__
