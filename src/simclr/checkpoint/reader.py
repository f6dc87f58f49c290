"""Reading a checkpoint file: the one reader, and loading its weights into a module.

:func:`read` is the only way the package opens a checkpoint (resume, eval, export, embed, feature
caches): it sniffs what the file is, checks it against its card (or, without one, its zip CRCs),
refuses a zip entry that would inflate far beyond its stored size, and unpickles with
``weights_only=True``. Every failure is one :class:`CheckpointError` naming the file, the problem
and the fix. :func:`load_weights` puts a state dict into a module, or says in one line how it differs.
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import CheckpointError
from ..files import read_small_json, sha256_file

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
# loading weights into a module
# ---------------------------------------------------------------------------------------------

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
