"""`simclr bench`: one path failing (out of memory, or any error) keeps the other's numbers and fails the exit
status; `--data folder` reads the folder it is given."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from simclr import bench
from simclr.cli import main
from simclr.runtime import out_of_memory

TINY = ["--arch", "resnet18", "--width", "8", "--batch_size", "16", "--steps", "1", "--warmup", "1",
        "--train_subset", "64", "--device", "cpu", "--workers", "0", "--isolate", "off"]  # run_path patched here


def _failing(monkeypatch, path: str, exc: Exception) -> list:
    """Make ``run_path`` raise ``exc`` for ``path``; returns the order the paths were started in."""
    real, started = bench.run_path, []

    def run_path(p, *a, **k):
        started.append(p)
        if p == path:
            raise exc
        return real(p, *a, **k)

    monkeypatch.setattr(bench, "run_path", run_path)
    return started


def test_an_out_of_memory_reference_path_keeps_the_fast_result(tmp_path, capsys, monkeypatch, data_root):
    started = _failing(monkeypatch, "reference", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate "
                                                                        "75.00 GiB"))
    out = tmp_path / "b.json"
    rc = main(["bench", *TINY, "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 1 and started == ["fast", "reference"]
    res = json.loads(out.read_text())
    by = {r["path"]: r for r in res["results"]}
    assert by["fast"]["status"] == "ok" and by["fast"]["images_per_s"] > 0 and by["fast"]["ms_per_step"] > 0
    assert by["reference"]["status"] == "oom" and "75.00 GiB" in by["reference"]["error"]
    assert res["failed"] == ["reference"] and res["speedup"] is None and res["complete"] is True
    assert "reference  OUT OF MEMORY" in captured.out
    assert captured.err.strip().startswith("error: bench path(s) failed: reference")


def test_a_failing_fast_path_is_an_error_string_and_the_reference_still_runs(tmp_path, capsys, monkeypatch,
                                                                             data_root):
    _failing(monkeypatch, "fast", ValueError("compile exploded\nsecond line"))
    out = tmp_path / "b.json"
    assert main(["bench", *TINY, "--json", str(out), "--repeat", "2"]) == 1
    res = json.loads(out.read_text())
    by = {r["path"]: r for r in res["results"]}
    assert by["fast"] == {"path": "fast", "status": "error", "error": "ValueError: compile exploded"}
    assert by["reference"]["status"] == "ok" and by["reference"]["images_per_s"] > 0
    # a failed path is not repeated; the reference is
    assert len(res["all_runs"]["fast"]) == 1 and len(res["all_runs"]["reference"]) == 2
    assert res["speedup_pairs"] == [] and res["speedup"] is None  # no pair has two successful runs
    # what older torch, the CPU allocator (its real message) and numpy raise are OOMs too
    assert out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                                      "allocate memory: you tried to allocate 1073741824 bytes. Error code 12"))
    assert out_of_memory(MemoryError())
    assert not out_of_memory(RuntimeError("shape mismatch"))


def test_bench_reads_the_image_folder_it_is_given(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / "train" / cls).mkdir(parents=True)
        for k in range(8):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / "train" / cls / f"{k}.jpg", quality=90)
    out = tmp_path / "b.json"
    rc = main(["bench", "--data", "folder", "--data_path", str(tmp_path / "imgs"), "--image_size", "32",
               "--arch", "resnet18", "--width", "8", "--batch_size", "8", "--steps", "1", "--warmup", "1",
               "--device", "cpu", "--workers", "0", "--isolate", "off", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["n_images"] == 16 and res["image_size"] == 32 and res["failed"] == []
    assert [r["path"] for r in res["results"]] == ["fast", "reference"]
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in res["results"])
