"""Checkpoints: the one reader, the one writer (atomic, with a checksum card), and run-folder helpers.

Our format (a dict saved with ``torch.save``):
    format="simclr", format_version, kind ("pretrain" | "linear" ...), step, config (plain dict),
    model (unwrapped state dict: no ``module.``/``_orig_mod.`` prefixes), optimizer, scaler,
    rng, metrics.
Beside every checkpoint ``X.pt`` lies ``X.json`` (``X.pth.json`` for exports): its SHA-256, size, step
and a short model card (architecture, data, metrics).

:func:`read` is the only way the package opens a checkpoint (resume, eval, export, embed, feature
caches): it sniffs what the file is, checks it against its card (or, without one, its zip CRCs),
refuses a zip entry that would inflate far beyond its stored size, and unpickles with
``weights_only=True``. Every failure is one :class:`CheckpointError` naming the file, the problem
and the fix.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import stat
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from .errors import CheckpointError
from .files import DiskFullError, atomic_write, check_own, is_temp, read_small_json, sha256_file
from .locks import BUSY, NONE, open_for_lock, try_lock, warn_unlocked

FORMAT = "simclr"
FORMAT_VERSION = 1
CKPT_RE = re.compile(r"^checkpoint-(\d+)\.pt\Z")  # the whole name: keep-checkpoint-1.pt is a user's file
CARD_RE = re.compile(r"^checkpoint-\d+\.json\Z")

# torch's legacy (pre-1.6, non-zip) format starts with its pickled magic number.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
# torch.save stores zip entries uncompressed (ratio 1); deflated real weights shrink by < 2x. An entry
# (or the archive) declaring far more bytes than it stores is a decompression bomb or a corrupt file,
# refused from the zip directory before anything is inflated.
MAX_INFLATE_RATIO = 20
INFLATE_FREE = 1 << 20  # entries this small may compress well (pickles of zero tensors)
MAX_CARD_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

def _unreadable(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable checkpoint: {why}")


def card_describes(path: Path) -> Optional[Path]:
    """The file a model card (JSON) describes, or None when ``path`` is not a card."""
    try:
        with open(path, "rb") as f:
            if f.read(64).lstrip()[:1] != b"{":
                return None
            f.seek(0)
            meta = json.loads(f.read(MAX_CARD_BYTES))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    name = meta.get("file")
    if isinstance(name, str) and name and Path(name).name == name:
        return path.with_name(name)
    stem = path.with_suffix("")  # X.pth.json describes X.pth (exports), X.json describes X.pt (training)
    return stem if stem.suffix else path.with_suffix(".pt")


def _card_target(path: Path, head: bytes) -> Optional[CheckpointError]:
    """A JSON file passed as the checkpoint: the error pointing at the file it describes."""
    target = card_describes(path) if head.lstrip()[:1] == b"{" else None
    if target is None:
        return None
    missing = "" if target.is_file() else " (it is not there: the card alone holds no weights)"
    return CheckpointError(f"{path} is a model card (JSON), not a checkpoint; pass the checkpoint it describes: "
                           f"{target}{missing}")


def resolve(path, log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)) -> Path:
    """What a user means where a checkpoint is expected: a run folder (or its checkpoints/) is its newest
    valid checkpoint, a model card is the file it describes; anything else is itself. Says which file it took."""
    path = Path(path)
    if path.is_dir():
        run = path.parent if path.name == "checkpoints" else path
        if (run / "checkpoints").is_dir() or (run / "status.json").is_file():
            found = latest_valid(run, log=log)
            if found is None:
                raise CheckpointError(f"{run} is a run folder without a valid checkpoint (none saved yet, or all "
                                      f"corrupt); pass a checkpoint file or a run that saved one")
            log(f"note: {path} is a run folder: using its newest valid checkpoint {found}")
            return found
        return path  # read() says it is a folder
    if path.suffix == ".json" and path.is_file():
        target = card_describes(path)
        if target is not None and target.is_file():
            log(f"note: {path} is a model card: using the checkpoint it describes, {target}")
            return target
    return path


def sniff(path: Path) -> str:
    """What ``path`` holds: 'torch-zip', 'torch-legacy' or 'safetensors'; anything else (missing, a folder,
    a FIFO, empty, a model card, a plain pickle, random bytes) is a CheckpointError saying what it is."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; pass a file inside it (a run's are "
                              f"<run>/checkpoints/checkpoint-NNNNNNNN.pt)")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a regular file (a pipe, socket or device); pass a checkpoint file")
    if st.st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted download or save? Use an earlier "
                              f"checkpoint or download it again")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if len(head) >= 4 and head.startswith(_TORCH_LEGACY_MAGIC[:len(head)]):
        return "torch-legacy"
    # safetensors: 8-byte little-endian header length, then a JSON header
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= st.st_size - 8:
        return "safetensors"
    card = _card_target(path, head)
    if card is not None:
        raise card
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise _unreadable(path, "it is a plain Python pickle, not a torch.save or safetensors file, and unpickling "
                                "it could run code; re-save the weights with torch.save or safetensors")
    raise _unreadable(path, f"neither a PyTorch checkpoint nor a safetensors file (it starts with bytes "
                            f"{head[:8].hex()}); the file is corrupt or something else entirely")


def _card_paths(path: Path) -> list:
    return [path.with_name(path.name + ".json"), path.with_suffix(".json")]


def read_card(path) -> dict:
    """The model card beside ``path`` (``X.pt.json`` for exports, ``X.json`` for training checkpoints),
    or {} when there is none. Only a card that names this file (or names no file) counts: ``X.json``
    may be the card of ``X.pt`` lying beside ``X.pth``."""
    path = Path(path)
    for card in _card_paths(path):
        if card == path or not card.is_file():
            continue
        meta = read_small_json(card, MAX_CARD_BYTES, follow_links=True)  # a released file may be a link; never huge
        if isinstance(meta, dict) and meta.get("file", path.name) == path.name:
            return dict(meta, card_path=str(card))
    return {}


def _verify_card(path: Path, card: dict) -> None:
    want = card.get("sha256")
    if want and sha256_file(path) != want:
        raise CheckpointError(f"{path} does not match the SHA-256 checksum in its model card "
                              f"{Path(card['card_path']).name}: the file is truncated or corrupt (use an earlier "
                              f"checkpoint, or re-download / re-export it)")


def _check_zip(path: Path, crc: bool) -> None:
    """The zip directory before torch reads it: intact, no entry inflating beyond MAX_INFLATE_RATIO; with
    ``crc`` (no card to check against) every entry's CRC-32 too (torch's reader does not check them)."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            packed = inflated = 0
            for i in infos:
                if i.compress_type == zipfile.ZIP_STORED:
                    if i.file_size != i.compress_size:
                        raise _unreadable(path, f"zip entry {i.filename} is corrupt (stored {i.compress_size} "
                                                f"bytes, declares {i.file_size})")
                    continue
                packed, inflated = packed + i.compress_size, inflated + i.file_size
                if i.file_size > INFLATE_FREE and i.file_size > MAX_INFLATE_RATIO * max(i.compress_size, 1):
                    raise _bomb(path, i.filename, i.file_size, i.compress_size)
            if inflated > INFLATE_FREE and inflated > MAX_INFLATE_RATIO * max(packed, 1):
                raise _bomb(path, f"{len(infos)} entries", inflated, packed)
            if crc:
                for i in infos:
                    if i.CRC or not i.file_size:  # a writer that skipped CRCs writes 0: nothing to check
                        with z.open(i) as f:
                            while f.read(1 << 22):
                                pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise _unreadable(path, f"it is truncated or corrupt (its zip archive: {str(e)[:120] or type(e).__name__}); "
                                f"use an earlier checkpoint or re-save it") from None


def _bomb(path: Path, what: str, size: int, stored: int) -> CheckpointError:
    return CheckpointError(f"{path}: {what} would inflate to {size / 2 ** 20:.0f} MiB from {stored / 2 ** 20:.1f} MiB "
                           f"stored (more than {MAX_INFLATE_RATIO}x); refusing to inflate it: a decompression bomb "
                           f"or a corrupt file, not something torch.save writes. Re-save the weights with torch.save")


def _read_safetensors(path: Path, map_location) -> dict:
    from safetensors import safe_open
    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own types (SafetensorError, OSError ...)
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                              f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    return {"format": "safetensors", "state_dict": sd, "metadata": meta}


def _names_code(msg: str) -> bool:
    """Whether the weights-only unpickler's message blocks a GLOBAL like ``posix.system`` (a file that needs
    code), not a GLOBAL made of random bytes (a corrupt file)."""
    m = re.search(r"GLOBAL (\S+)", msg)
    return bool(m) and all(part.isidentifier() for part in m.group(1).rstrip(".,:;").split("."))


def _unpickle(path: Path, trust: bool, map_location) -> Any:
    try:
        if trust:
            warnings.warn(f"loading {path} with full unpickling (--trust_checkpoint): only do this for files "
                          f"you trust", stacklevel=3)
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # garbage often "uses" pickle protocol 113: torch warns before failing; the error says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message always mentions weights_only; only a GLOBAL the safe unpickler blocked, naming
        # a real dotted name, means the file needs code to load; anything else (bad load key, a GLOBAL
        # of random bytes ...) is a corrupt or non-PyTorch file
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        msg = next((ln for ln in lines if "GLOBAL" in ln), lines[-1] if lines else type(e).__name__)
        if _names_code(msg) and not trust:
            raise CheckpointError(f"refusing to load {path}: it needs code beyond tensors and plain data to "
                                  f"unpickle ({msg[:200]}). If you trust its source, pass "
                                  f"--trust_checkpoint true.") from None
        raise _unreadable(path, "truncated, corrupt or not a PyTorch file; use an earlier checkpoint or "
                                "re-save it") from None
    except Exception as e:
        # the weights-only unpickler runs no code from the file, so whatever it raises on garbage
        # (IndexError, KeyError, struct.error, RuntimeError, MemoryError ...) means an unreadable file
        first = str(e).splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise _unreadable(path, f"truncated, corrupt or not a PyTorch file ({first}); use an earlier "
                                f"checkpoint or re-save it") from None


def read(path, *, trust: bool = False, map_location="cpu") -> dict:
    """The content of any checkpoint file, as a dict; the one reader of the package.

    sniff the file -> verify its card's SHA-256 (or, without a card, its zip CRCs) -> check zip entry
    sizes before inflating -> ``torch.load(weights_only=True)`` (``argparse.Namespace`` allowed for the
    spec's files; full unpickling only with ``trust=True``, the user's ``--trust_checkpoint``). A
    safetensors file reads as ``{"format": "safetensors", "state_dict": ..., "metadata": ...}``.
    Every failure is a :class:`CheckpointError`.
    """
    path = Path(path)
    kind = sniff(path)
    card = read_card(path)
    _verify_card(path, card)
    if kind == "safetensors":
        return _read_safetensors(path, map_location)
    if kind == "torch-zip":
        _check_zip(path, crc=not card.get("sha256"))
    obj = _unpickle(path, trust, map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict (found {type(obj).__name__}); expected our "
                              f"checkpoint, the spec's .pth.tar or a state dict")
    return obj


# ---------------------------------------------------------------------------------------------
# writing
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


# ---------------------------------------------------------------------------------------------
# run folders
# ---------------------------------------------------------------------------------------------

def unwrap_state_dict(sd: dict) -> dict:
    """Drop DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix) or f".{prefix}" in k:
                k = k[len(prefix):] if k.startswith(prefix) else k.replace(f".{prefix}", ".")
        out[k] = v
    return out


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


def latest_valid(run_dir: Path, log=print) -> Optional[Path]:
    """The newest checkpoint that passes its checksum, loads, and is one of ours; others are skipped with a
    warning, and one pruned while it was looked at is passed over in silence. The one returned is pinned
    (:func:`pin`): the caller reads it, then unpins it."""
    for p in list_checkpoints(run_dir):
        if not pin(p):
            continue
        try:
            if is_ours(read(p)):
                return p
            log(f"warning: skipping {p.name}: not a checkpoint of this project")
        except CheckpointError as e:
            if p.exists():
                log(f"warning: skipping {p.name}: {e}")
        unpin(p)
    return None


def _take_for_removal(path: Path) -> Optional[int]:
    """An exclusive lock on ``path`` when no reader holds it (the descriptor), else None. The file is opened for
    writing: NFS, which emulates flock with a byte-range lock, grants no exclusive lock on a read-only file. Where
    the file system keeps no locks, the descriptor unlocked (the file is pruned as if no one read it)."""
    try:
        fd = open_for_lock(path, exclusive=True)
    except OSError:
        return None
    try:
        if try_lock(fd, path, exclusive=True) != BUSY:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def prune(run_dir: Path, keep_last: int, pattern: re.Pattern = CKPT_RE,
          keep: Callable[[int], bool] = lambda step: False) -> None:
    """Keep the newest ``keep_last`` checkpoints named as ``pattern`` says (see :func:`list_checkpoints`), and
    those whose step ``keep`` names (one a reader is reading waits for the next save); also remove what a killed
    save left behind (temp files, a card whose checkpoint never got renamed into place). Only the one process that
    writes the run folder calls this, right after a complete save, so no temp file here belongs to a save in
    progress."""
    for p in list_checkpoints(run_dir, pattern)[keep_last:]:
        if keep(int(pattern.search(p.name).group(1))):
            continue
        fd = _take_for_removal(p)
        if fd is None:
            continue
        try:
            for f in (p, p.with_suffix(".json")):
                if f.is_file() and not f.is_symlink():
                    f.unlink(missing_ok=True)
        finally:
            os.close(fd)
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if not p.is_file() or p.is_symlink():
            continue
        if is_temp(p) and p.name.startswith(".checkpoint-"):
            p.unlink(missing_ok=True)
        elif CARD_RE.match(p.name) and not p.with_suffix(".pt").exists() and _is_our_card(p):
            p.unlink(missing_ok=True)


def _is_our_card(path: Path) -> bool:
    """Whether ``path`` is a card a save wrote (checksum and our format), not a user's JSON under such a name."""
    card = read_small_json(path, MAX_CARD_BYTES)
    return isinstance(card, dict) and card.get("format") == FORMAT and isinstance(card.get("sha256"), str)


def model_state(model: torch.nn.Module) -> dict:
    m = model.module if hasattr(model, "module") else model
    return unwrap_state_dict(m.state_dict())


def load_weights(module: torch.nn.Module, state: dict, what: str, fix: str) -> None:
    """``module.load_state_dict(state)``, or one :class:`CheckpointError`: ``what`` (the file and its part),
    how the weights differ (the first tensor of another shape, with both shapes; counts of missing and
    unexpected ones) and ``fix``. torch's own message lists every tensor on a line of its own."""
    own = module.state_dict()
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} holds no weights ({describe(state)}); {fix}")
    reshaped = [k for k, v in state.items() if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    problems = []
    if reshaped:
        k = reshaped[0]
        problems.append(f"{len(reshaped)} tensors of another shape (first: {k} is {list(state[k].shape)} there, "
                        f"{list(own[k].shape)} here)")
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if not problems:
        try:
            module.load_state_dict(state)
            return
        except (RuntimeError, TypeError, ValueError) as e:
            problems.append(str(e).strip().splitlines()[-1].strip())
    raise CheckpointError(f"{what} does not fit this model: {'; '.join(problems)}; {fix}")


def describe(ckpt: Any) -> str:
    if isinstance(ckpt, dict):
        return f"dict with keys {sorted(map(str, ckpt))[:8]}"
    return type(ckpt).__name__
