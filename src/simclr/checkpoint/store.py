"""The checkpoints a run keeps: writing one atomically with its card, their names in a run folder, listing them,
pinning one against pruning while it is read, pruning, and finding what a user means by a checkpoint (a run
folder: its newest valid one). Files are opened by :func:`simclr.checkpoint.reader.read`."""
from __future__ import annotations

import json
import os
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from ..errors import CheckpointError
from ..files import DiskFullError, atomic_write, check_own, is_temp, read_small_json, sha256_file
from ..progress import ALWAYS
from ..locks import BUSY, NONE, open_for_lock, try_lock, warn_unlocked
from .reader import MAX_CARD_BYTES, card_describes, read

log = logging.getLogger(__name__)

FORMAT = "simclr"
FORMAT_VERSION = 1
CKPT_RE = re.compile(r"^checkpoint-(\d+)\.pt\Z")  # the whole name: keep-checkpoint-1.pt is a user's file
CARD_RE = re.compile(r"^checkpoint-\d+\.json\Z")


# ---------------------------------------------------------------------------------------------
# writing (state dicts unwrapped, each file with its card)
# ---------------------------------------------------------------------------------------------

def write_with_card(path: Path, content: Union[bytes, Callable], card: dict, card_file: Optional[Path] = None) -> dict:
    """Write ``content`` to ``path`` atomically and a model card (``card`` plus the SHA-256 and size of the
    bytes written) to ``card_file`` (default ``path.with_suffix('.json')``). Returns the card.

    The card goes first: a crash between the two renames leaves a card whose checksum does not match
    the (older) file, which :func:`read` then refuses and a resume skips — never a stale card that
    vouches for new bytes."""
    path = Path(path)
    card_file = Path(card_file) if card_file is not None else path.with_suffix(".json")
    written: dict = {}

    def card_first(tmp: Path) -> None:
        written.update({"file": path.name, "sha256": sha256_file(tmp), "bytes": tmp.stat().st_size, **card})
        atomic_write(card_file, json.dumps(written, indent=2, default=str))

    atomic_write(path, content, before_replace=card_first)
    return written


def save_checkpoint(path: Path, payload: dict, card: Optional[dict] = None) -> str:
    """Write ``payload`` to ``path`` (atomically, see :func:`write_with_card`) with its card
    ``path.with_suffix('.json')``. Returns the checksum. On any failure (disk full ...) an existing file
    at ``path`` — and every other checkpoint — is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    payload.setdefault("format", FORMAT)
    payload.setdefault("format_version", FORMAT_VERSION)
    meta = {"step": payload.get("step"), "format": FORMAT, "format_version": FORMAT_VERSION, **(card or {})}
    try:
        return write_with_card(path, lambda f: torch.save(payload, f), meta)["sha256"]
    except DiskFullError:
        raise DiskFullError(f"disk full while saving {path}; the previous checkpoints are intact. "
                            f"Free space and resume with --resume auto.") from None


def unwrap_state_dict(sd: dict) -> dict:
    """Drop DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix) or f".{prefix}" in k:
                k = k[len(prefix):] if k.startswith(prefix) else k.replace(f".{prefix}", ".")
        out[k] = v
    return out


def model_state(model: torch.nn.Module) -> dict:
    m = model.module if hasattr(model, "module") else model
    return unwrap_state_dict(m.state_dict())


# ---------------------------------------------------------------------------------------------
# a run folder's checkpoints: names, listing, pins, the newest valid one
# ---------------------------------------------------------------------------------------------

def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"checkpoint-{step:08d}.pt"


def list_checkpoints(run_dir: Path, pattern: re.Pattern = CKPT_RE) -> list:
    """Checkpoints of a run folder, newest (highest step) first: regular files only (a folder under a checkpoint's
    name is the user's, never read or pruned; a save to its name fails with one error line). A symlink there, or a
    ``checkpoints`` that is a symlink, is refused: the run would train from, overwrite and prune another's files.
    ``pattern``: the whole file name, its one group the step (an evaluation's ``linear-head-<step>.pt``)."""
    folder = Path(run_dir) / "checkpoints"
    if not check_own(folder, folder=True):
        return []
    found = []
    for p in folder.iterdir():
        m = pattern.search(p.name)
        if m is None or p.is_dir() and not p.is_symlink():
            continue
        check_own(p)
        found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def is_ours(ck: Any) -> bool:
    """A checkpoint this project wrote (any kind), as opposed to a foreign dict under our file name."""
    return isinstance(ck, dict) and ck.get("format") == FORMAT and isinstance(ck.get("model"), dict)


# Readers and the pruning writer agree through flock(2) on the checkpoint file itself: a reader holds a shared
# lock from choosing a checkpoint until it has read it (pin ... unpin); prune takes an exclusive lock without
# waiting and leaves a file that is being read for the next save to prune. Evaluating a run while it trains
# therefore never finds its checkpoint removed mid-read.
_PINS: dict = {}


def pin(path: Path) -> bool:
    """Hold a shared lock on checkpoint ``path`` (until :func:`unpin` or the process ends) so that the run writing
    it does not prune it while it is read. False when the file is gone (pruned since it was listed). Where the file
    system keeps no locks the file is read unpinned (:mod:`simclr.locks` warns once)."""
    key = os.path.abspath(path)
    if key in _PINS:
        return True
    try:
        fd = open_for_lock(path, exclusive=False)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # unreadable: read() says why in one line
    try:
        got = try_lock(fd, path, exclusive=False, wait=True)
    except OSError as e:  # a lock the file system refuses in its own way: read it unpinned, not skip it
        warn_unlocked(path, e)
        got = NONE
    try:
        held, now = os.fstat(fd), os.stat(path)
        if (held.st_ino, held.st_dev) != (now.st_ino, now.st_dev):
            raise FileNotFoundError(path)
    except OSError:
        os.close(fd)
        return False
    if got == NONE:
        os.close(fd)
        return True
    _PINS[key] = fd
    return True


def unpin(path: Path) -> None:
    fd = _PINS.pop(os.path.abspath(path), None)
    if fd is not None:
        os.close(fd)


def latest_valid(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint that passes its checksum, loads, and is one of ours; others are skipped with a
    warning, and one pruned while it was looked at is passed over in silence. The one returned is pinned
    (:func:`pin`): the caller reads it, then unpins it."""
    for p in list_checkpoints(run_dir):
        if not pin(p):
            continue
        try:
            if is_ours(read(p)):
                return p
            log.warning(f"warning: skipping {p.name}: not a checkpoint of this project")
        except CheckpointError as e:
            if p.exists():
                log.warning(f"warning: skipping {p.name}: {e}")
        unpin(p)
    return None



def resolve(path) -> Path:
    """What a user means where a checkpoint is expected: a run folder (or its checkpoints/) is its newest
    valid checkpoint, a model card is the file it describes; anything else is itself. Says which file it took."""
    path = Path(path)
    if path.is_dir():
        run = path.parent if path.name == "checkpoints" else path
        if (run / "checkpoints").is_dir() or (run / "status.json").is_file():
            found = latest_valid(run)
            if found is None:
                raise CheckpointError(f"{run} is a run folder without a valid checkpoint (none saved yet, or all "
                                      f"corrupt); pass a checkpoint file or a run that saved one")
            log.info(f"note: {path} is a run folder: using its newest valid checkpoint {found}", extra=ALWAYS)
            return found
        return path  # read() says it is a folder
    if path.suffix == ".json" and path.is_file():
        target = card_describes(path)
        if target is not None and target.is_file():
            log.info(f"note: {path} is a model card: using the checkpoint it describes, {target}", extra=ALWAYS)
            return target
    return path



# ---------------------------------------------------------------------------------------------
# pruning (only the process that writes the run folder)
# ---------------------------------------------------------------------------------------------

def _take_for_removal(path: Path) -> tuple:
    """(descriptor, busy): an exclusive lock on ``path`` when no reader holds it (descriptor, False); (None, True)
    when a reader holds it; (None, False) when the file cannot be opened for writing (not ours to prune). The file
    is opened for writing: NFS, which emulates flock with a byte-range lock, grants no exclusive lock on a read-only
    file. Where the file system keeps no locks, the descriptor unlocked (the file is pruned as if no one read it)."""
    try:
        fd = open_for_lock(path, exclusive=True)
    except OSError:
        return None, False
    try:
        if try_lock(fd, path, exclusive=True) != BUSY:
            return fd, False
    except OSError:
        os.close(fd)
        return None, False
    os.close(fd)
    return None, True


def prune(run_dir: Path, keep_last: int, pattern: re.Pattern = CKPT_RE,
          keep: Callable[[int], bool] = lambda step: False, *, wait_s: float = 0.0) -> list:
    """Keep the newest ``keep_last`` checkpoints named as ``pattern`` says (see :func:`list_checkpoints`), and those
    whose step ``keep`` names; also remove what a killed save left behind (temp files, a card
    whose checkpoint never got renamed into place). Only the one process that writes the run folder calls this,
    right after a complete save, so no temp file here belongs to a save in progress.

    A checkpoint a reader is reading (pinned: readers hold the pin only while they read the file) is passed over:
    the next save prunes it. The last save of a run has no next save, so it passes ``wait_s``: the readers' pins
    are tried again for up to that long. Returns the checkpoints still kept beyond ``keep_last``."""
    deadline = time.monotonic() + max(0.0, wait_s)
    held = _prune_once(run_dir, keep_last, pattern, keep)
    while held and time.monotonic() < deadline:
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        held = _prune_once(run_dir, keep_last, pattern, keep)
    return held


def _prune_once(run_dir: Path, keep_last: int, pattern: re.Pattern, keep: Callable[[int], bool]) -> list:
    held = []
    for p in list_checkpoints(run_dir, pattern)[keep_last:]:
        if keep(int(pattern.search(p.name).group(1))):
            continue
        fd, busy = _take_for_removal(p)
        if fd is None:
            if busy:
                held.append(p)
            continue
        try:
            for f in (p, p.with_suffix(".json")):
                if f.is_file() and not f.is_symlink():
                    f.unlink(missing_ok=True)
        finally:
            os.close(fd)
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return held
    for p in folder.iterdir():
        if not p.is_file() or p.is_symlink():
            continue
        if is_temp(p) and p.name.startswith(".checkpoint-"):
            p.unlink(missing_ok=True)
        elif CARD_RE.match(p.name) and not p.with_suffix(".pt").exists() and _is_our_card(p):
            p.unlink(missing_ok=True)
    return held


def _is_our_card(path: Path) -> bool:
    """Whether ``path`` is a card a save wrote (checksum and our format), not a user's JSON under such a name."""
    card = read_small_json(path, MAX_CARD_BYTES)
    return isinstance(card, dict) and card.get("format") == FORMAT and isinstance(card.get("sha256"), str)


