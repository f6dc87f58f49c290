"""Values from outside validated where they enter: run folders whose JSON or YAML hold what no table can show
cost their own row in `simclr runs`, never the table (real runs, the real CLI, in this process)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.helpers.folder_runs import cli, knn_args, pretrain_args, tiny_folder

_RUN: list = []


@pytest.fixture(autouse=True, scope="module")
def _run(data_root, tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("runs")
    rc, _, err = cli(*pretrain_args(tiny_folder(tmp / "data", data_root), tmp / "logs", iters=2))
    assert rc == 0, err
    (_RUN[:]) = list((tmp / "logs" / "t").iterdir())
    yield
    torch.set_num_threads(n)


def three_runs(tmp_path):
    root = tmp_path / "logs"
    runs = []
    for i in range(3):
        runs.append(root / "t" / f"run-{i}")
        shutil.copytree(_RUN[0], runs[-1])
    return root, runs


def test_a_huge_integer_in_status_or_metrics_costs_one_row_not_the_table(tmp_path):
    """Observation: a 400-digit integer in a run's status.json/metrics.jsonl killed `simclr runs`
    (OverflowError: the whole table lost)."""
    root, (good, bad_status, bad_metrics) = three_runs(tmp_path)
    st = json.loads((bad_status / "status.json").read_text())
    text = json.dumps(st).replace(f'"started": {json.dumps(st["started"])}', '"started": ' + "9" * 400)
    (bad_status / "status.json").write_text(text)
    with open(bad_metrics / "metrics.jsonl", "a") as f:
        f.write('{"step": ' + "7" * 400 + ', "loss": 1.0}\n{"step": 3, "loss": ' + "8" * 400 + '}\n')
    rc, out, err = cli("runs", "--root", root)
    assert rc == 0, err
    assert "Traceback" not in err
    for r in (good, bad_status, bad_metrics):
        assert r.name in out, out


def test_an_alias_bomb_config_yaml_in_a_run_folder_is_not_expanded(tmp_path):
    """Observation: an 800-byte alias-bomb config.yaml inside any run folder made `simclr runs` spin forever
    (run folders' YAML skipped the limits --config files get)."""
    root, (good, bomb, _) = three_runs(tmp_path)
    lines = ['a0: &a0 {k: [1, 2, 3, 4, 5, 6, 7, 8, 9]}']
    for i in range(1, 9):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} {{" + ", ".join(f"k{j}: {prev}" for j in range(9)) + "}")
    (bomb / "config.yaml").write_text("\n".join(lines) + "\n")
    rc, out, err = cli("runs", "--root", root)
    assert rc == 0, err
    assert good.name in out and bomb.name in out


@pytest.mark.parametrize("per_class", [{"cat": "x", "dog": 50.0}, {"cat": None, "dog": 50.0}])
def test_a_hand_edited_per_class_in_eval_json_is_drawn_without_what_is_no_number(tmp_path, trained_ckpt,
                                                                                 data_root, per_class):
    """`simclr report EVAL_RUN` on an eval.json whose per_class held a string or null was a ValueError/TypeError
    traceback from the plot."""
    data = tiny_folder(tmp_path / "data", data_root, n_train=4, n_test=2)
    rc, _, err = cli(*knn_args(data, tmp_path / "logs", trained_ckpt))
    assert rc == 0, err
    (run,) = (tmp_path / "logs" / "t").iterdir()
    ev = json.loads((run / "eval.json").read_text())
    (run / "eval.json").write_text(json.dumps(dict(ev, per_class=per_class)))
    rc, _, err = cli("report", run, "--out", tmp_path / "rep", "--no_pictures", "true")
    assert rc == 0 and "Traceback" not in err, err
    assert (tmp_path / "rep" / "report.html").is_file()
