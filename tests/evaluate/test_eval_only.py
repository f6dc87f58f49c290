"""Eval-only (simclr.evaluate.run): a saved head is scored by class name, on the test split alone."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import run_cli

CLASSES = ("automobile", "cat", "ship")


def _folder(data_root, dest, splits=("train", "test"), n=12):
    for split in splits:
        for c in CLASSES:
            (dest / split / c).mkdir(parents=True)
            for f in sorted((data_root / "cifar10" / split / c).iterdir())[:n]:
                shutil.copy(f, dest / split / c / f.name)
    return dest


def _common(tmp_path, data, name):
    return ["--data", "folder", "--data_path", data, "--root", tmp_path / "logs", "--name", name, "--seed", "0",
            "--workers", "0", "--device", "cpu", "--verbose", "false"]


@pytest.fixture
def head(tmp_path, data_root, trained_ckpt):
    data = _folder(data_root, tmp_path / "data")
    r = run_cli("eval", "--encoder_ckpt", trained_ckpt, "--protocol", "fast-linear", *_common(tmp_path, data, "fit"))
    assert r.returncode == 0, r.stderr[-2000:]
    (res,) = (tmp_path / "logs" / "fit").glob("*/eval.json")
    ev = json.loads(res.read_text())
    return data, res.parent / ev["head_ckpt"], ev


def _eval_only(tmp_path, trained_ckpt, data, ckpt, name):
    return run_cli("eval", "--encoder_ckpt", trained_ckpt, "--eval_only", "true", "--ckpt", ckpt,
                   *_common(tmp_path, data, name))


def test_a_renamed_class_folder_is_refused_naming_both_names(tmp_path, trained_ckpt, head):
    data, ckpt, _ = head
    (data / "test" / "automobile").rename(data / "test" / "car")
    r = _eval_only(tmp_path, trained_ckpt, data, ckpt, "renamed")
    assert r.returncode != 0
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "automobile" in err[0] and "car" in err[0], r.stderr[-1500:]


def test_a_head_is_matched_by_class_name_not_position(tmp_path, trained_ckpt, head):
    """The head's rows and names permuted together (as another order of the same classes) score the same."""
    data, ckpt, ev = head
    ck = torch.load(ckpt, weights_only=True)
    order = [2, 0, 1]
    ck["state_dict"] = {k: v[order] for k, v in ck["state_dict"].items()}
    ck["classes"] = [ck["classes"][i] for i in order]
    permuted = tmp_path / "permuted.pt"
    torch.save(ck, permuted)
    r = _eval_only(tmp_path, trained_ckpt, data, permuted, "permuted")
    assert r.returncode == 0, r.stderr[-2000:]
    (res,) = (tmp_path / "logs" / "permuted").glob("*/eval.json")
    again = json.loads(res.read_text())
    assert again["top1"] == pytest.approx(ev["top1"]) and again["per_class"] == pytest.approx(ev["per_class"])


def test_eval_only_reads_no_training_split(tmp_path, data_root, trained_ckpt, head):
    _, ckpt, ev = head
    only_test = _folder(data_root, tmp_path / "only_test", splits=("test",))
    r = _eval_only(tmp_path, trained_ckpt, only_test, ckpt, "test_only")
    assert r.returncode == 0, r.stderr[-2000:]
    (res,) = (tmp_path / "logs" / "test_only").glob("*/eval.json")
    again = json.loads(res.read_text())
    assert again["n_train"] == 0 and again["top1"] == pytest.approx(ev["top1"])
    assert "eval-only: top-1" in r.stdout and "(eval-only)" not in r.stdout
