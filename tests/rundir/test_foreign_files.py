"""No command overwrites or deletes a file it did not write: `simclr compare --out` and `simclr report --out`,
replayed through the real CLI (in this process) on real run folders."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.helpers.folder_runs import cli, one_error, one_error_line, pretrain_args, tiny_folder, tree_digest
from simclr import checkpoint as ckpt_lib

_RUNS: list = []


@pytest.fixture(autouse=True, scope="module")
def _runs(data_root, tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("runs")
    data = tiny_folder(tmp / "data", data_root)
    for lr in (0.5, 0.1):
        rc, _, err = cli(*pretrain_args(data, tmp / "logs", iters=2, lr=lr))
        assert rc == 0, err
    _RUNS[:] = sorted(p for p in (tmp / "logs" / "t").iterdir())
    yield
    torch.set_num_threads(n)


def copies(tmp_path: Path) -> list:
    out = []
    for i, r in enumerate(_RUNS):
        shutil.copytree(r, tmp_path / f"r{i}")
        out.append(tmp_path / f"r{i}")
    return out


def test_compare_refuses_to_write_over_a_file_it_did_not_write(tmp_path):
    """Observation: `simclr compare A B --out FILE` wrote a PNG over any file (A's newest checkpoint)."""
    a, b = copies(tmp_path)
    ck = ckpt_lib.list_checkpoints(a)[0]
    before = ck.read_bytes()
    rc, _, err = cli("compare", a, b, "--out", ck)
    one_error(rc, err, str(ck), "--force")
    assert ck.read_bytes() == before
    picture = tmp_path / "holiday.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n not ours")
    rc, _, err = cli("compare", a, b, "--out", picture)
    one_error(rc, err, "--force")
    assert picture.read_bytes() == b"\x89PNG\r\n\x1a\n not ours"
    rc, _, err = cli("compare", a, b, "--out", picture, "--force", "true")  # asked for: overwritten
    assert rc == 0, err
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"simclr report" in picture.read_bytes()[:4096]


def test_compare_writes_over_its_own_figure(tmp_path):
    a, b = copies(tmp_path)
    for _ in range(2):
        rc, out, err = cli("compare", a, b)
        assert rc == 0, err
    assert (a / "compare.png").is_file()


def test_report_out_deletes_only_the_pictures_its_own_manifest_lists(tmp_path):
    """Observation: `simclr report RUN --out DIR` deleted every *.png already in DIR/report/."""
    (a, _) = copies(tmp_path)
    out = tmp_path / "site"
    (out / "report").mkdir(parents=True)
    mine = out / "report" / "team-logo.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\n logo")
    rc, _, err = cli("report", a, "--out", out, "--no_pictures", "true")
    assert rc == 0, err
    listed = json.loads((out / "report" / "manifest.json").read_text())["files"]
    assert listed and "team-logo.png" not in listed
    assert all((out / "report" / f).is_file() for f in listed)
    rc, _, err = cli("report", a, "--out", out, "--no_pictures", "true")  # again: its own files replaced
    assert rc == 0, err
    assert mine.read_bytes() == b"\x89PNG\r\n\x1a\n logo"


def test_a_failed_report_leaves_the_previous_reports_pictures(tmp_path, monkeypatch):
    """Observation: a failed report deleted the previous report's pictures first. The second report fails at
    its first figure (as a full disk would)."""
    from simclr.errors import UserError
    from simclr.report import plots
    (a, _) = copies(tmp_path)
    rc, _, err = cli("report", a, "--no_pictures", "true")
    assert rc == 0, err
    pictures = {p.name: p.read_bytes() for p in (a / "report").glob("*.png")}
    assert pictures

    def disk_full(*args, **kwargs):
        raise UserError("disk full while writing curves.png")

    monkeypatch.setattr(plots, "plot_curves", disk_full)
    rc, _, err = cli("report", a, "--no_pictures", "true")
    one_error(rc, err, "disk full")
    assert {p.name: p.read_bytes() for p in (a / "report").glob("*.png")} == pictures


def test_report_refuses_to_write_over_a_page_it_did_not_write(tmp_path):
    (a, _) = copies(tmp_path)
    out = tmp_path / "site"
    out.mkdir()
    (out / "report.html").write_text("<html>the team's own page</html>")
    rc, _, err = cli("report", a, "--out", out, "--no_pictures", "true")
    one_error(rc, err, "report.html", "--force")
    assert (out / "report.html").read_text() == "<html>the team's own page</html>"


def test_export_refuses_to_write_over_a_file_no_export_wrote(tmp_path):
    """`simclr export A --out B/checkpoints/<B's newest>` replaced another run's checkpoint with an encoder (and
    its card went over any file named <out>.json)."""
    a, b = copies(tmp_path)
    target = ckpt_lib.list_checkpoints(b)[0]
    before = tree_digest(b)
    rc, _, err = cli("export", a, "--out", target)
    one_error(rc, err, str(target), "did not write", "--force")
    assert tree_digest(b) == before
    out = tmp_path / "enc.pth"
    notes = tmp_path / "enc.pth.json"  # a user's file where the card goes
    notes.write_text('{"my": "notes"}')
    rc, _, err = cli("export", a, "--out", out)
    one_error(rc, err, str(notes), "--force")
    assert notes.read_text() == '{"my": "notes"}' and not out.exists()
    notes.unlink()
    for _ in range(2):  # an earlier export (its card vouches for its bytes) is ours to replace
        rc, _, err = cli("export", a, "--out", out)
        assert rc == 0, err
    out.write_bytes(out.read_bytes() + b"edited")  # ... until someone changed it
    one_error(*cli("export", a, "--out", out)[::2], "--force")
    rc, _, err = cli("export", a, "--out", target, "--force", "true")  # asked for: overwritten
    assert rc == 0, err
    assert "conv1.weight" in torch.load(target, weights_only=True)


def test_embed_refuses_to_write_over_files_no_embed_wrote(tmp_path, data_root):
    """`simclr embed --out FILE.npy` wrote over any .npy (and its .files.txt) of the user's."""
    import numpy as np
    a, _ = copies(tmp_path)
    images = tiny_folder(tmp_path / "data", data_root, n_train=2, n_test=2) / "test"
    mine = tmp_path / "mine.npy"
    np.save(mine, np.arange(6.0).reshape(3, 2))
    before = mine.read_bytes()
    args = ["embed", "--encoder_ckpt", a, "--images", images, "--device", "cpu"]
    one_error(*cli(*args, "--out", mine)[::2], str(mine), "--force")
    assert mine.read_bytes() == before and not (tmp_path / "mine.files.txt").exists()
    (tmp_path / "list.files.txt").write_text("my list\n")  # a list of the user's where the names go
    one_error(*cli(*args, "--out", tmp_path / "list.npy")[::2], "list.files.txt", "--force")
    assert (tmp_path / "list.files.txt").read_text() == "my list\n" and not (tmp_path / "list.npy").exists()
    for _ in range(2):  # an earlier embed's pair is its own to replace
        rc, _, err = cli(*args, "--out", tmp_path / "f.npy")
        assert rc == 0, err
    assert np.load(tmp_path / "f.npy").shape[0] == len((tmp_path / "f.files.txt").read_text().splitlines()) == 8
    rc, _, err = cli(*args, "--out", mine, "--force", "true")
    assert rc == 0, err
    assert np.load(mine).shape[0] == 8


def test_bench_json_refuses_a_file_it_did_not_write_before_any_work(tmp_path):
    results = tmp_path / "results.json"
    results.write_text('{"mine": 1}')
    one_error(*cli("bench", "--data", "folder", "--data_path", tmp_path / "nowhere", "--json", results)[::2],
              str(results), "--json", "--force")
    assert results.read_text() == '{"mine": 1}'


def test_report_refuses_pictures_of_its_names_it_did_not_write_and_a_manifest_cannot_make_it_delete(tmp_path):
    """`simclr report RUN --out DIR` wrote over a user's DIR/report/curves.png (and listed it as its own); a
    manifest.json edited to list notes.txt made the next report delete it."""
    (a, _) = copies(tmp_path)
    out = tmp_path / "site"
    (out / "report").mkdir(parents=True)
    theirs = out / "report" / "curves.png"
    theirs.write_bytes(b"\x89PNG\r\n\x1a\n their curves")
    rc, _, err = cli("report", a, "--out", out, "--no_pictures", "true")
    one_error(rc, err, "curves.png", "--force")
    assert theirs.read_bytes() == b"\x89PNG\r\n\x1a\n their curves" and not (out / "report.html").exists()
    rc, _, err = cli("report", a, "--out", out, "--no_pictures", "true", "--force", "true")  # asked for
    assert rc == 0, err
    notes = out / "report" / "notes.txt"
    notes.write_text("mine")
    manifest = out / "report" / "manifest.json"
    listed = json.loads(manifest.read_text())["files"]
    manifest.write_text(json.dumps({"files": listed + ["notes.txt"]}))
    rc, _, err = cli("report", a, "--out", out, "--no_pictures", "true")
    assert rc == 0, err
    assert notes.read_text() == "mine"


def test_embed_on_a_full_disk_leaves_the_earlier_pair_as_it_was(tmp_path, data_root, monkeypatch):
    """The disk fills while the names are written: the earlier .npy must not have been replaced already (it was,
    and the message still said the previous version was intact)."""
    import errno

    import numpy as np

    from simclr import files
    a, _ = copies(tmp_path)
    images = tiny_folder(tmp_path / "data", data_root, n_train=2, n_test=2) / "test"
    args = ["embed", "--encoder_ckpt", a, "--images", images, "--device", "cpu", "--out", tmp_path / "f.npy"]
    rc, _, err = cli(*args, "--layer", "z")
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in tmp_path.glob("f.*")}
    real = files.atomic_write

    def full_for_names(path, content, **kw):
        if str(path).endswith(".files.txt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, content, **kw)

    monkeypatch.setattr(files, "atomic_write", full_for_names)
    rc, _, err = cli(*args, "--layer", "h")  # other features: a replaced .npy would differ
    assert rc != 0 and "disk full" in err and "previous version is intact" in err
    assert {p.name: p.read_bytes() for p in tmp_path.glob("f.*")} == before
    assert np.load(tmp_path / "f.npy").shape[0] == len((tmp_path / "f.files.txt").read_text().splitlines())


def test_a_report_folder_that_is_a_symlink_is_refused_and_its_target_untouched(trained_run, tmp_path):
    run = trained_run
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "mine.png").write_bytes(b"a picture of the user's")  # a stale-picture sweep would delete it
    (run / "report").symlink_to(outside)
    msg = one_error_line(run_cli("report", run, "--no_pictures"))
    assert f"{run / 'report'} is a symbolic link" in msg and "--out" in msg
    assert [p.name for p in outside.iterdir()] == ["mine.png"]
    assert (outside / "mine.png").read_bytes() == b"a picture of the user's"
    assert (run / "report").is_symlink() and not (run / "report.html").exists()
