"""Cases still failing from earlier reports, replayed through the real CLI: a FIFO in a run folder, nested run
names, --skip_bad_images in knn/eval, EXIF orientation, a report of an absurd iters, a hand-edited config.yaml."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from tests.helpers.folder_runs import cli, one_error, pretrain_args, tiny_folder

_DATA: list = []


@pytest.fixture(autouse=True, scope="module")
def _setup(data_root, tmp_path_factory):
    _DATA[:] = [tiny_folder(tmp_path_factory.mktemp("tiny"), data_root)]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def one_run(tmp_path: Path, **over) -> Path:
    rc, out, err = cli(*pretrain_args(_DATA[0], tmp_path / "logs", **over))
    assert rc == 0, err
    (status,) = (tmp_path / "logs").rglob("status.json")
    return status.parent


# ------------------------------------------------------------------------------------------------
# (a) a FIFO named metrics.jsonl blocked `simclr runs` forever
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["metrics.jsonl", "status.json", "config.yaml", "eval.json"])
def test_a_fifo_in_a_run_folder_is_skipped_with_a_note_not_read(tmp_path, name):
    run = one_run(tmp_path, iters=2)
    (run / name).unlink(missing_ok=True)
    os.mkfifo(run / name)
    # a real process: blocking forever is the fault; 120 s bounds the test, not asserted
    r = run_cli("runs", "--root", tmp_path / "logs", subprocess=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert run.name in r.stdout, r.stdout
    (note,) = [ln for ln in r.stderr.splitlines() if ln.startswith("note:")]
    assert f"{name} (a FIFO)" in note and str(run) in note, note


# ------------------------------------------------------------------------------------------------
# (b) --name a/b/c/d made runs that `simclr runs` never listed
# ------------------------------------------------------------------------------------------------
def test_a_nested_run_name_is_listed(tmp_path, capsys):
    run = one_run(tmp_path, iters=1, save_freq=0, name="a/b/c/d")
    assert run.parent == tmp_path / "logs" / "a" / "b" / "c" / "d"
    rc, out, err = cli("runs", "--root", tmp_path / "logs", "--format", "csv", "--columns", "id,name")
    assert rc == 0, err
    assert f"{run.name},a/b/c/d" in out, out


def test_a_run_name_nested_deeper_than_runs_looks_is_refused(tmp_path):
    name = "/".join(f"p{i}" for i in range(16))
    rc, out, err = cli(*pretrain_args(_DATA[0], tmp_path / "logs", name=name, iters=1))
    one_error(rc, err, "--name", "16 parts", "simclr runs")
    assert not (tmp_path / "logs").exists()


# ------------------------------------------------------------------------------------------------
# (d) a JPEG's EXIF orientation was ignored: a phone's portrait photo was read sideways
# ------------------------------------------------------------------------------------------------
def _reference(raw: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels (H, W, 3) as EXIF orientation says they are seen, by numpy's own flips and turns."""
    return {1: raw, 2: raw[:, ::-1], 3: raw[::-1, ::-1], 4: raw[::-1], 5: raw.transpose(1, 0, 2),
            6: np.rot90(raw, -1), 7: raw.transpose(1, 0, 2)[::-1, ::-1], 8: np.rot90(raw, 1)}[orientation]


def _photo(path: Path, orientation: int) -> np.ndarray:
    """A 24x16 JPEG (wider than high: a landscape as stored) tagged with ``orientation``; its stored pixels."""
    from PIL import Image
    rng = np.random.default_rng(orientation)
    blocks = rng.integers(0, 256, (3, 2, 3), dtype=np.uint8)  # 8x8 blocks: the JPEG keeps them nearly exact
    pixels = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as im:  # PIL decodes the stored pixels and ignores the tag
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_jpeg_is_read_upright_as_its_exif_orientation_says(tmp_path, orientation):
    from simclr.data import get_dataset
    from simclr.data.fast import decode_batch
    from simclr.data.images import jpeg_orientation, open_rgb
    for split in ("train", "test"):
        for c in ("portrait", "landscape"):
            (tmp_path / split / c).mkdir(parents=True)
    raw = _photo(tmp_path / "train" / "portrait" / "phone.jpg", orientation)
    _photo(tmp_path / "train" / "landscape" / "plain.jpg", 1)
    want = _reference(raw, orientation)
    path = tmp_path / "train" / "portrait" / "phone.jpg"
    assert jpeg_orientation(path.read_bytes()) == orientation
    assert np.array_equal(np.asarray(open_rgb(path)), want)  # the one decoder
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    (fast,) = decode_batch([data], torch.device("cpu"))  # the fast loader's batched JPEG decoder
    assert np.array_equal(fast.permute(1, 2, 0).numpy(), want)
    ds = get_dataset("folder", "train", str(tmp_path), 0)  # a dataset of such files (embed, eval, pretrain)
    assert ds.classes == ["landscape", "portrait"] and ds.targets == [0, 1]  # image 1 is the phone's
    assert np.array_equal(np.asarray(ds.load(1)), want)


# ------------------------------------------------------------------------------------------------
# (e) `simclr report` of a run whose config.yaml says iters: 2e11 died with a MemoryError
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("iters", ["2.0e+11", "200000000000", ".inf"])
def test_report_of_an_absurd_iters_draws_the_schedule_with_bounded_work(tmp_path, iters):
    import re
    run = one_run(tmp_path, iters=2, save_freq=0)
    cfg = run / "config.yaml"
    cfg.write_text(re.sub(r"(?m)^iters: .*$", f"iters: {iters}", cfg.read_text()))
    rc, out, err = cli("report", run, "--no_pictures", "true")
    assert rc == 0, err
    assert "Traceback" not in err and "MemoryError" not in err
    assert (run / "report.html").is_file() and (run / "report" / "lr.png").is_file()


def test_the_planned_schedule_of_a_long_run_is_drawn_at_bounded_points(tmp_path, monkeypatch):
    """The planned learning rate at the points drawn equals the formula (warmup 10%, then cosine) at those steps."""
    import math
    from simclr.report import plots
    drawn = {}

    def keep(self, x, y=None, *a, **k):
        drawn.setdefault("xy", (np.asarray(x), np.asarray(y)))
        return []
    import matplotlib.axes
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", keep)
    iters, lr = 10 ** 12, 2.0
    plots.plot_lr([], {"iters": iters, "lr": lr, "lr_schedule": "warmup-anneal", "warmup": 0.1}, tmp_path / "lr.png")
    x, y = drawn["xy"]
    assert len(x) == plots.PLANNED_POINTS and x[-1] == iters
    for i in (0, len(x) // 20, len(x) // 2, len(x) - 1):
        s = (x[i] - 1) / iters  # the fraction of the run done before that step
        want = lr * s / 0.1 if s < 0.1 else lr * 0.5 * (1 + math.cos(math.pi * (s - 0.1) / 0.9))
        assert abs(y[i] - want) < 1e-3 * lr, (i, y[i], want)


# ------------------------------------------------------------------------------------------------
# (f) `--resume RUN` after hand-editing RUN/config.yaml suggested the very command that had failed
# ------------------------------------------------------------------------------------------------
def test_a_hand_edited_config_yaml_is_named_with_both_values_and_the_fix_works(tmp_path):
    import yaml
    run = one_run(tmp_path, iters=4, stop_after=2)
    cfg = run / "config.yaml"
    original = cfg.read_text()
    saved_lr = yaml.safe_load(original)["lr"]
    cfg.write_text(original.replace(f"\nlr: {saved_lr}\n", "\nlr: 0.125\n"))
    rc, _, err = cli("pretrain", "--resume", run)
    line = one_error(rc, err, f"{cfg} differs from the config saved in checkpoint-00000002.pt",
                     f"lr: 0.125 there, {saved_lr!r} in the checkpoint", f"put back lr: {saved_lr!r}",
                     "--allow_config_change true")
    assert "--resume RUN_DIR" not in line and "simclr pretrain --resume" not in line, line
    rc, _, err = cli("pretrain", "--resume", run, "--temperature", 0.25)  # an option given now is named as such
    one_error(rc, err, "lr: 0.125 there", "options that change the run (temperature: 0.5 -> 0.25)", "leave them out")
    cfg.write_text(original)  # the advice, followed
    rc, _, err = cli("pretrain", "--resume", run)
    assert rc == 0, err
