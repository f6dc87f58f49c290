"""The one checkpoint reader (``simclr.checkpoint.read``) and every entry point built on it.

Hostile and broken files — pickles that run code, random bytes, a model card passed instead of its
checkpoint, a zip bomb, a FIFO — end in one ``CheckpointError`` (in the library) or one ``error:`` line
with exit code 2 (on the command line), never a traceback, never running code from the file, never
inflating a bomb. Files are real; command-line behaviour runs through real ``python -m simclr``
subprocesses.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_cli, tiny_args
from simclr import checkpoint as ckpt_lib
from simclr import cli
from simclr.errors import CheckpointError
from simclr.evaluate.linear import load_head
from simclr.models import SimCLRModel
from simclr.weights import load_encoder, load_linear_head


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------

class RunsShell:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class WritesFile:
    """Unpickling this calls Path.write_text on ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned"))


def tiny_encoder_payload(step: int = 1) -> dict:
    torch.manual_seed(0)
    model = SimCLRModel("resnet18", cifar_stem=True, width=8)
    return {"kind": "pretrain", "step": step, "config": {"arch": "resnet18", "width": 8, "data": "cifar10"},
            "model": ckpt_lib.model_state(model)}


def evil_files(folder: Path, markers: Path) -> dict:
    """Checkpoints that look real (our layout, the spec's, a linear head) but carry code, in both torch
    formats. name -> path; unpickling any of them creates a file in ``markers``."""
    folder.mkdir(parents=True, exist_ok=True)
    markers.mkdir(parents=True, exist_ok=True)
    out = {}
    out["ours-zip-os.system"] = folder / "ours.pt"
    torch.save({**tiny_encoder_payload(), "format": "simclr", "x": RunsShell(markers / "ours-zip")},
               out["ours-zip-os.system"])
    out["spec-legacy-pathlib"] = folder / "spec.pth.tar"
    torch.save({"state_dict": tiny_encoder_payload()["model"], "hparams": argparse.Namespace(arch="resnet18"),
                "x": WritesFile(markers / "spec-legacy")}, out["spec-legacy-pathlib"],
               _use_new_zipfile_serialization=False)
    out["spec-zip-pathlib"] = folder / "spec-zip.pth.tar"
    torch.save({"state_dict": tiny_encoder_payload()["model"], "hparams": argparse.Namespace(arch="resnet18"),
                "x": WritesFile(markers / "spec-zip")}, out["spec-zip-pathlib"])
    out["head-zip-os.system"] = folder / "head.pth.tar"
    torch.save({"state_dict": {"weight": torch.zeros(10, 64), "bias": torch.zeros(10)},
                "hparams": RunsShell(markers / "head-zip")}, out["head-zip-os.system"])
    return out


@pytest.fixture
def evil(tmp_path):
    markers = tmp_path / "markers"
    return evil_files(tmp_path / "evil", markers), markers


def tiny_folder(root: Path, data_root: Path) -> Path:
    """A --data folder dataset of 32 training and 8 test images of the real CIFAR-10 copy (2 classes)."""
    for split, n in (("train", 16), ("test", 4)):
        for c in ("cat", "ship"):
            (root / split / c).mkdir(parents=True)
            for f in sorted((data_root / "cifar10" / split / c).iterdir())[:n]:
                shutil.copy(f, root / split / c / f.name)
    return root


def one_error_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------
# code in a pickle: refused by every public entry point
# ----------------------------------------------------------------------------------------------

def test_the_evil_files_really_run_code_when_trusted(evil, tmp_path):
    """Without this, refusing them would prove nothing."""
    files, markers = evil
    for name, path in files.items():
        with pytest.warns(UserWarning, match="trust_checkpoint"):
            ckpt_lib.read(path, trust=True)
    assert sorted(p.name for p in markers.iterdir()) == ["head-zip", "ours-zip", "spec-legacy", "spec-zip"]
    # the explicit flag is how a user loads such an encoder anyway: it works, with a warning
    (markers / "spec-zip").unlink()
    with pytest.warns(UserWarning, match="trust_checkpoint"):
        enc = load_encoder(files["spec-zip-pathlib"], trust=True)
    assert enc.arch == "resnet18" and (markers / "spec-zip").read_text() == "pwned"


@pytest.mark.parametrize("entry", ["checkpoint.read", "weights.load_encoder", "weights.load_linear_head",
                                   "evaluate.linear.load_head"])
def test_library_entry_points_refuse_code(evil, entry):
    files, markers = evil
    load = {"checkpoint.read": ckpt_lib.read, "weights.load_encoder": load_encoder,
            "weights.load_linear_head": load_linear_head, "evaluate.linear.load_head": load_head}[entry]
    for name, path in files.items():
        with pytest.raises(CheckpointError) as err:
            load(path)
        msg = str(err.value)
        assert str(path) in msg and "--trust_checkpoint" in msg and "\n" not in msg, (name, msg)
    assert list(markers.iterdir()) == []


def test_resume_auto_skips_a_checkpoint_with_code(evil, tmp_path, said):
    files, markers = evil
    run = tmp_path / "run"
    target = ckpt_lib.checkpoint_path(run, 5)
    target.parent.mkdir(parents=True)
    shutil.copy(files["ours-zip-os.system"], target)
    assert ckpt_lib.latest_valid(run) is None
    warnings = said(logging.WARNING)
    assert len(warnings) == 1 and "checkpoint-00000005.pt" in warnings[0] and "--trust_checkpoint" in warnings[0]
    assert list(markers.iterdir()) == []


def test_cli_entry_points_refuse_code(evil, tmp_path, data_root, capsys):
    """eval (encoder and head), export, embed and pretrain --ckpt through the command-line entry point:
    exit 2, one error line naming the file and the flag, no marker, nothing written."""
    files, markers = evil
    enc, head = str(files["ours-zip-os.system"]), str(files["head-zip-os.system"])
    imgs = tiny_folder(tmp_path / "data", data_root)
    logs = tmp_path / "logs"
    out = tmp_path / "out"
    commands = {
        "eval --encoder_ckpt": ["eval", "--encoder_ckpt", enc, "--device", "cpu", "--root", logs, "--name", "e"],
        "eval --ckpt": ["eval", "--eval_only", "true", "--ckpt", head, "--encoder_arch", "resnet18",
                        "--encoder_width", "8", "--device", "cpu", "--root", logs, "--name", "e"],
        "export": ["export", enc, "--out", out / "enc.pth"],
        "embed": ["embed", "--encoder_ckpt", enc, "--images", imgs / "test", "--out", out / "f.npy"],
        "pretrain --ckpt": ["pretrain", *tiny_args(tmp_path, data="folder", data_path=imgs, train_subset=0,
                                                   test_subset=0, batch_size=8, iters=2, ckpt=enc)],
    }
    for name, argv in commands.items():
        path = head if name == "eval --ckpt" else enc
        rc = cli.main([str(a) for a in argv])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (name, err)
        assert path in lines[0] and "--trust_checkpoint" in lines[0], (name, lines[0])
        assert list(markers.iterdir()) == [], name
    assert not logs.exists() and not out.exists()


# ----------------------------------------------------------------------------------------------
# garbage never gives a traceback
# ----------------------------------------------------------------------------------------------

_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _torch_bytes(legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save({"format": "simclr", "step": 3, "model": {"w": torch.arange(6.0).reshape(2, 3)},
                "hparams": argparse.Namespace(arch="resnet18")}, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _rezip(raw: bytes, pickle_bytes) -> bytes:
    """The same torch zip with its data.pkl replaced (CRCs recomputed, so only the unpickler can object)."""
    src, out = zipfile.ZipFile(io.BytesIO(raw)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            data = src.read(info)
            z.writestr(info.filename, pickle_bytes(data) if info.filename.endswith("data.pkl") else data)
    return out.getvalue()


def _mutate(rng, data: bytes, n: int) -> bytes:
    b = bytearray(data)
    for _ in range(n):
        b[int(rng.integers(len(b)))] = int(rng.integers(256))
    return bytes(b)


def garbage(seed: int) -> bytes:
    """Seeded garbage of five kinds: plain random bytes; torch's legacy magic number then random bytes; a
    valid torch zip whose pickle is random bytes; one whose pickle has 3 random bytes changed; a legacy
    file with 3 random bytes changed. The last three reach the weights-only unpickler, which raises
    IndexError, KeyError, UnicodeDecodeError, RuntimeError ... on them."""
    rng = np.random.default_rng(seed)
    kind = seed % 5
    if kind == 0:
        return rng.bytes(int(rng.integers(1, 4096)))
    if kind == 1:
        return _LEGACY_MAGIC + rng.bytes(int(rng.integers(1, 2048)))
    if kind == 2:
        return _rezip(_torch_bytes(), lambda d: rng.bytes(len(d)))
    if kind == 3:
        return _rezip(_torch_bytes(), lambda d: _mutate(rng, d, 3))
    return _mutate(rng, _torch_bytes(legacy=True), 3)


def test_fifty_garbage_files_are_one_clear_error(tmp_path, capsys):
    refused = 0
    for seed in range(50):
        path = tmp_path / f"garbage-{seed:02d}.pt"
        path.write_bytes(garbage(seed))
        try:
            ck = ckpt_lib.read(path)  # a few mutated files still unpickle: they must come back as a dict
            assert isinstance(ck, dict), seed
        except CheckpointError as e:
            refused += 1
            assert str(path) in str(e) and "\n" not in str(e), (seed, str(e))
        with pytest.raises(CheckpointError, match=str(path)):
            load_encoder(path)
        assert cli.main(["export", str(path), "--out", str(tmp_path / "out.pth")]) == 2, seed
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1 and str(path) in err, (seed, err)
        assert not (tmp_path / "out.pth").exists()
    assert refused >= 45  # the seeds above: all but a couple of mutated legacy files


def test_garbage_through_a_real_process(tmp_path):
    """The same, as a user runs it: a valid torch zip whose pickle is random bytes."""
    path = tmp_path / "garbage.pt"
    path.write_bytes(garbage(102))
    one_error_line(run_cli("export", path, "--out", tmp_path / "out.pth"), str(path))


def test_card_less_checkpoint_with_a_flipped_byte_is_refused(tmp_path):
    """Without a card the zip's own CRC-32s are checked (torch's reader ignores them)."""
    path = tmp_path / "ck.pt"
    ckpt_lib.save_checkpoint(path, {"step": 1, "model": {"w": torch.randn(256, 256)}})
    path.with_suffix(".json").unlink()
    assert ckpt_lib.read(path)["step"] == 1
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    data[info.header_offset + 200] ^= 0x01  # inside the tensor's bytes (the local header is ~60 bytes)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ckpt_lib.read(path)


def test_folder_fifo_missing_and_plain_pickle(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder"):
        ckpt_lib.read(tmp_path)
    fifo = tmp_path / "ck.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):  # and it does not hang reading it
        ckpt_lib.read(fifo)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        ckpt_lib.read(tmp_path / "nope.pt")
    import pickle
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="plain Python pickle"):
        ckpt_lib.read(plain)


# ----------------------------------------------------------------------------------------------
# a model card passed as the checkpoint
# ----------------------------------------------------------------------------------------------

def test_card_passed_as_checkpoint_points_at_its_file(tmp_path):
    ck = tmp_path / "run" / "checkpoint-00000001.pt"
    ckpt_lib.save_checkpoint(ck, tiny_encoder_payload())
    card = ck.with_suffix(".json")
    with pytest.raises(CheckpointError) as err:
        ckpt_lib.read(card)
    assert "model card" in str(err.value) and str(ck) in str(err.value)
    # an export's card (X.pth.json) points at X.pth, through the command line
    exported = tmp_path / "enc.pth"
    assert cli.main(["export", str(ck), "--out", str(exported)]) == 0
    r = run_cli("embed", "--encoder_ckpt", f"{exported}.json", "--images", tmp_path, "--out", tmp_path / "f.npy")
    assert f"is a model card: using the checkpoint it describes, {exported}" in r.stderr
    # a card whose checkpoint is gone says so
    ck.unlink()
    with pytest.raises(CheckpointError, match="it is not there"):
        ckpt_lib.read(card)


# ----------------------------------------------------------------------------------------------
# a decompression bomb
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A 4.7 MB torch file whose one storage inflates to 1 GiB (deflated zeros)."""
    buf = io.BytesIO()
    torch.save({"format": "simclr", "step": 1, "model": {"w": torch.zeros(4)}}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    path = tmp_path_factory.mktemp("bomb") / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for info in src.infolist():
            if not info.filename.endswith("data/0"):
                z.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_STORED)
                continue
            chunk = bytes(1 << 24)
            with z.open(info.filename, "w", force_zip64=True) as f:
                for _ in range(64):
                    f.write(chunk)
    with zipfile.ZipFile(path) as z:
        assert sum(i.file_size for i in z.infolist()) > 1 << 30  # the fixture is what it claims
    assert path.stat().st_size < 8 << 20
    return path


def test_bomb_refused_before_inflating(bomb, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("torch.load reached: the bomb would be inflated")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(CheckpointError, match="refusing to inflate") as err:
        ckpt_lib.read(bomb)
    assert str(bomb) in str(err.value) and "1024 MiB" in str(err.value)


PEAK_MEMORY = """
import sys
from simclr.cli import main
rc = main(sys.argv[1:])
print(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")), end="")
sys.exit(rc)
"""


BASELINE_MEMORY = """
import simclr.export, simclr.weights, simclr.checkpoint, torch, torchvision
print(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")), end="")
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc/self/status")
def test_bomb_through_the_cli_stays_small(bomb, tmp_path):
    """A real process: exit 2 with one error line, and its peak resident memory (VmHWM, this process's
    own) stays far below the 1 GiB the entry would inflate to."""
    r = subprocess.run([sys.executable, "-c", PEAK_MEMORY, "export", str(bomb), "--out", str(tmp_path / "o.pth")],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    one_error_line(r, str(bomb), "refusing to inflate")
    peak_kib = int(r.stdout.split()[1])
    # the reference: a process that imports what export does and reads nothing (torch's own peak differs from
    # machine to machine, 300 to 900 MiB); inflating the entry would add 1 GiB to it
    base = subprocess.run([sys.executable, "-c", BASELINE_MEMORY], capture_output=True, text=True, timeout=600,
                          cwd=REPO, check=True)
    base_kib = int(base.stdout.split()[1])
    assert (peak_kib - base_kib) * 1024 < 256 << 20, (r.stdout, base.stdout)
    assert not (tmp_path / "o.pth").exists()


# ----------------------------------------------------------------------------------------------
# export must not overwrite its input's card
# ----------------------------------------------------------------------------------------------

def test_export_refuses_out_equal_to_the_inputs_card(tmp_path):
    ck = tmp_path / "checkpoint-00000001.pt"
    ckpt_lib.save_checkpoint(ck, tiny_encoder_payload())
    card = ck.with_suffix(".json")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    one_error_line(run_cli("export", ck, "--out", card), "model card of the input checkpoint")
    for out in (ck, tmp_path / "checkpoint-00000001"):  # the input itself; a name whose card is the input's
        assert cli.main(["export", str(ck), "--out", str(out)]) == 2
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # an export's own card (X.pth.json) when re-exporting X.pth
    exported = tmp_path / "enc.pth"
    assert cli.main(["export", str(ck), "--out", str(exported)]) == 0
    card_bytes = Path(f"{exported}.json").read_bytes()
    assert cli.main(["export", str(exported), "--out", f"{exported}.json"]) == 2
    assert Path(f"{exported}.json").read_bytes() == card_bytes
