"""Values from outside are refused where they enter: one ``error:`` line at parse time, nothing written."""
from __future__ import annotations

import json

from pathlib import Path

import pytest
from tests.helpers.folder_runs import cli, one_error, pretrain_args, tiny_folder


def _pretrain(tmp_path: Path, *extra) -> tuple:
    # a data folder that does not exist: an option accepted at parse time fails later on a message about the data
    return cli("pretrain", "--data", "folder", "--data_path", tmp_path / "nodata", "--root", tmp_path / "runs",
               "--device", "cpu", "--iters", 1, "--batch_size", 2, *extra)


@pytest.mark.parametrize("key,value,needle", [
    ("seed", "1e23", "seed"),
    ("seed", "1" * 24, "seed"),
    ("seed", "-2", "seed"),
    ("seed", str(2 ** 32), "seed"),
    ("color_dist_s", "1e308", "color_dist_s"),
    ("blur_sigma", "inf,inf", "blur_sigma"),
    ("blur_sigma", "0.1,nan", "blur_sigma"),
    ("width", str(2 ** 70), "width"),
    ("name", "a\x00b", "name"),
    ("name", "a\x1b[31mb", "name"),
    ("name", "a\nb", "name"),
])
def test_pretrain_option_values_refused_at_parse_time(tmp_path, key, value, needle):
    rc, out, err = _pretrain(tmp_path, f"--{key}", value)
    line = one_error(rc, err, f"'{needle}'")
    assert "\x00" not in line and "\x1b" not in line, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("key,value", [("l2_grid", "1e400"), ("l2_grid", "0.1,inf"), ("data_split_seed", "-1"),
                                       ("data_split_seed", str(2 ** 32)), ("seed", "1e23")])
def test_eval_option_values_refused_at_parse_time(tmp_path, key, value):
    rc, out, err = cli("eval", "--data", "folder", "--data_path", tmp_path / "nodata", "--root", tmp_path / "runs",
                       "--encoder_ckpt", tmp_path / "missing.pt", "--protocol", "fast-linear", "--device", "cpu",
                       f"--{key}={value}")
    one_error(rc, err, f"'{key}'")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("env,needle", [
    (dict(RANK="0", WORLD_SIZE="2", SIMCLR_DIST_TIMEOUT="5m"), "SIMCLR_DIST_TIMEOUT='5m'"),
    (dict(RANK="0", WORLD_SIZE="2", SIMCLR_DIST_TIMEOUT="0"), "SIMCLR_DIST_TIMEOUT='0'"),
    (dict(RANK="0", WORLD_SIZE="2", MASTER_PORT="http"), "MASTER_PORT='http'"),
    (dict(RANK="0", WORLD_SIZE="2", MASTER_PORT="99999"), "MASTER_PORT='99999'"),
    (dict(RANK="0", WORLD_SIZE="two"), "WORLD_SIZE='two'"),
    (dict(RANK="2", WORLD_SIZE="2"), "RANK=2"),
    (dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="-1"), "LOCAL_RANK='-1'"),
    (dict(SLURM_PROCID="x", SLURM_NTASKS="4"), "SLURM_PROCID='x'"),
    (dict(SIMCLR_PROCS_PER_NODE="all"), "SIMCLR_PROCS_PER_NODE='all'"),
])
def test_environment_variables_refused_where_they_enter(tmp_path, data_root, monkeypatch, env, needle):
    """A launcher's or job script's value read with a bare int() was a ValueError traceback (at import time for
    SIMCLR_DIST_TIMEOUT) or a port torch choked on: now one line naming the variable, before any run folder."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    data = tiny_folder(tmp_path / "data", data_root, n_train=4, n_test=2)
    rc, _, err = cli(*pretrain_args(data, tmp_path / "runs", batch_size=4, iters=1, dist="ddp"))
    one_error(rc, err, needle, "environment variable")
    assert not (tmp_path / "runs").exists()


def test_a_data_root_that_is_a_file_is_named_not_blamed_on_a_download(tmp_path, monkeypatch):
    """DATA_ROOT naming a file said 'downloading failed too (FileExistsError: offline?)'."""
    (tmp_path / "afile").write_text("f")
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "afile"))
    rc, _, err = cli("pretrain", "--data", "cifar10", "--root", tmp_path / "runs", "--device", "cpu", "--iters", 1)
    line = one_error(rc, err, str(tmp_path / "afile"), "is a file", "DATA_ROOT")
    assert "download" not in line
    assert not (tmp_path / "runs").exists()


def test_seed_bounds_accepted(tmp_path):
    """The ends of the seed range are valid values: the error is then about the missing data, not the seed."""
    for seed in ("-1", "0", str(2 ** 32 - 1)):
        rc, out, err = _pretrain(tmp_path, "--seed", seed)
        line = one_error(rc, err, "not found")
        assert "'seed'" not in line, line


# ------------------------------------------------------------------------------------------------
# names from data and users are drawn as plain text (no matplotlib mathtext)
# ------------------------------------------------------------------------------------------------
MATH = "$\\foo$"  # invalid mathtext: matplotlib raises on it unless it is drawn as plain text


@pytest.fixture(scope="module")
def dollar_runs(tmp_path_factory, data_root) -> list:
    """Two tiny runs named with a '$' pair, on a dataset whose one class folder is called ``$\\foo$``."""
    base = tmp_path_factory.mktemp("dollar")
    data = tiny_folder(base / "data", data_root, n_train=8, n_test=5)
    for split in ("train", "test"):
        (data / split / "cat").rename(data / split / MATH)
    runs = []
    for i, lr in enumerate((0.5, 0.25)):
        rc, out, err = cli(*pretrain_args(data, base / "runs", name=f"r{i}{MATH}", lr=lr, eval_freq=2))
        assert rc == 0, err
        (run,) = [p.parent for p in (base / "runs").glob(f"r{i}*/*/status.json")]
        runs.append(run)
    return runs


def test_report_draws_a_dollar_class_name_as_text(dollar_runs, tmp_path):
    rc, out, err = cli("report", dollar_runs[0], "--out", tmp_path / "rep", "--device", "cpu", "--queries", 2,
                       "--gallery", 32, "--embed", 20)
    assert rc == 0, err
    assert "Traceback" not in err
    pngs = sorted((tmp_path / "rep").rglob("*.png"))
    assert len(pngs) >= 3, pngs
    assert "foo" in (next((tmp_path / "rep").rglob("*.html"))).read_text()


def test_compare_draws_dollar_run_names_as_text(dollar_runs, tmp_path):
    rc, out, err = cli("compare", *dollar_runs, "--out", tmp_path / "cmp.png")
    assert rc == 0, err
    assert "Traceback" not in err
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def test_a_class_folder_name_with_escape_sequences_is_printed_escaped(tmp_path, trained_ckpt, data_root):
    """A class folder named with a terminal escape sequence and a carriage return went raw into the error line:
    the user's terminal was recoloured and the start of the line overwritten."""
    data = tiny_folder(tmp_path / "data", data_root, n_train=4, n_test=2)
    odd = data / "train" / "x\x1b[31mred\rcat"  # only in the training split: the error names it
    odd.mkdir()
    for f in sorted((data / "train" / "cat").iterdir()):
        (odd / f.name).write_bytes(f.read_bytes())
    rc, _, err = cli("knn", "--data", "folder", "--data_path", data, "--image_size", 32, "--encoder_ckpt",
                     trained_ckpt, "--device", "cpu", "--root", tmp_path / "runs", "--cache_features", "false")
    line = one_error(rc, err, "classes differ", "x\\x1b[31mred\\x0dcat")
    assert "\x1b" not in err and "\r" not in err, line


def test_a_run_name_with_escape_sequences_is_shown_escaped_in_the_runs_table(trained_run, tmp_path):
    """A run's name (its config.yaml, edited or written elsewhere) went raw into the table: ESC [2J cleared the
    terminal it was printed on."""
    config = trained_run / "config.yaml"
    text = config.read_text()
    assert "\nname: t\n" in text
    config.write_text(text.replace("\nname: t\n", '\nname: "n\\e[2Jame"\n'))
    rc, out, err = cli("runs", "--root", tmp_path / "logs")
    assert rc == 0, err
    assert "n\\x1b[2Jame" in out and "\x1b" not in out, out


# ------------------------------------------------------------------------------------------------
# messages suggest only what the command accepts
# ------------------------------------------------------------------------------------------------
def _broken(tmp_path, data_root, split: str) -> Path:
    data = tiny_folder(tmp_path / "data", data_root, n_train=4, n_test=3)
    (data / split / "cat" / "broken.png").write_bytes(b"not an image at all")
    return data


@pytest.mark.parametrize("command", ["knn", "eval"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_eval_bad_image_message_names_an_option_eval_accepts(tmp_path, data_root, command, split):
    """Observation: knn/eval named --skip_bad_images as the fix for an unreadable image, then refused the option.
    Now they accept it: the advice of the message, followed, evaluates the readable images."""
    data = _broken(tmp_path, data_root, split)
    base = [command, "--data", "folder", "--data_path", data, "--encoder_arch", "resnet18", "--encoder_width", 8,
            "--image_size", 32, "--device", "cpu", "--workers", 0, "--root", tmp_path / "runs",
            "--cache_features", "false"]
    base += ["--k", 3] if command == "knn" else ["--protocol", "fast-linear"]
    rc, out, err = cli(*base)
    one_error(rc, err, "broken.png", "Remove or replace the file", "--skip_bad_images true")
    rc, out, err = cli(*base, "--skip_bad_images", "true")
    assert rc == 0, err
    (warning,) = [ln for ln in (out + err).splitlines() if "warning: skipped 1 unreadable" in ln]
    assert f"of the {split} split" in warning and "broken.png" in warning, warning
    (result,) = (tmp_path / "runs").rglob("eval.json")
    n_test = json.loads(result.read_text())["n_test"]
    assert n_test == 4 * 3, "the accuracy is over the readable test images (the broken one is the 13th)"


def test_pretrain_bad_image_message_still_names_its_option(tmp_path, data_root):
    data = _broken(tmp_path, data_root, "train")
    rc, out, err = cli(*pretrain_args(data, tmp_path / "runs"))
    one_error(rc, err, "broken.png", "--skip_bad_images true")


# ------------------------------------------------------------------------------------------------
# a resume whose optimizer does not fit the checkpoint's: one line
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [("--opt", "adam"), ("--lars_exclude", "spec")])
def test_resume_with_another_optimizer_is_one_line(interrupted_run, extra):
    rc, out, err = cli("pretrain", "--resume", interrupted_run, "--allow_config_change", "true", *extra,
                       "--device", "cpu", "--workers", 0)
    one_error(rc, err, "optimizer")


# ------------------------------------------------------------------------------------------------
# the optional cache degrades to one warning
# ------------------------------------------------------------------------------------------------
def test_an_unwritable_cache_is_one_warning_and_the_evaluation_finishes(tmp_path, data_root, monkeypatch,
                                                                        trained_ckpt):
    data = tiny_folder(tmp_path / "data", data_root, n_train=4, n_test=3)
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("a file where the cache folder goes")
    monkeypatch.setenv("SIMCLR_CACHE", str(blocker))
    rc, out, err = cli("knn", "--data", "folder", "--data_path", data, "--encoder_ckpt", trained_ckpt,
                       "--image_size", 32, "--device", "cpu", "--workers", 0,
                       "--root", tmp_path / "runs", "--cache_features", "true", "--k", 3)
    assert rc == 0, err
    assert "Traceback" not in err and "error:" not in err, err
    warnings = [ln for ln in err.splitlines() if "warning: cannot write the cache" in ln]
    assert len(warnings) == 1, err
    assert "--root" not in warnings[0]
    assert (tmp_path / "runs").exists() and list((tmp_path / "runs").rglob("status.json"))
    assert blocker.read_text() == "a file where the cache folder goes"
