"""scripts/readme_check.py: the markers tying the README's numbers to commands, the comparison and the rewrite
(on a small synthetic page, nothing run), and every command the README and docs/ show parses."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("readme_check", REPO / "scripts" / "readme_check.py")
rc = sys.modules["readme_check"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rc)

PAGE = """# Demo

<!-- run demo: make demo -->
`make demo` prints 30.60%<!-- check: demo.init --> -> 36.20%<!-- check: demo.after --> (top-5
87.80%<!-- check: demo.after5 -->), measured 2026-01-01<!-- check: date --> in 3.9<!-- check: demo.minutes --> min.

<!-- run knn: simclr knn --encoder_ckpt $ENC --seed 0 -->
| kNN | `simclr knn --encoder_ckpt $ENC --seed 0` | 36.20<!-- check: knn.top1 --> | 87.80<!-- check: knn.top5 --> |

```text
an example, not a marker: 99.99<!-- check: knn.top1 -->
```
Nor is this: `98.00<!-- check: knn.top5 -->`.
"""


def _write(tmp_path, text=PAGE, name="README.md") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_markers_are_parsed_and_those_in_code_blocks_are_not(tmp_path):
    runs, checks = rc.collect([_write(tmp_path)])
    assert runs == {"demo": "make demo", "knn": "simclr knn --encoder_ckpt $ENC --seed 0"}
    assert [(c.key, c.written) for c in checks] == [
        ("demo.init", "30.60"), ("demo.after", "36.20"), ("demo.after5", "87.80"), ("date", "2026-01-01"),
        ("demo.minutes", "3.9"), ("knn.top1", "36.20"), ("knn.top5", "87.80")]


@pytest.mark.parametrize("page, message", [
    ("<!-- run a: simclr runs -->\nnot shown\n", "not shown in the page's text"),
    ("`simclr runs`\n<!-- run a: simclr runs -->\n1.0<!-- check: b.top1 -->\n", "no command 'b' declared"),
    ("`simclr runs`\n<!-- run a: simclr runs -->\n1.0<!-- check: a.nope -->\n", "unknown field 'nope'"),
    ("`simclr runs` `simclr knn`\n<!-- run a: simclr runs -->\n<!-- run a: simclr knn -->\n", "declared twice"),
])
def test_bad_markers_are_refused_with_the_reason(tmp_path, page, message):
    with pytest.raises(rc.CheckError, match=re.escape(message)):
        rc.collect([_write(tmp_path, page)])


def test_a_command_hidden_in_a_comment_does_not_count_as_shown(tmp_path):
    page = "<!-- simclr runs --><!-- run a: simclr runs -->\n"
    with pytest.raises(rc.CheckError, match="not shown"):
        rc.collect([_write(tmp_path, page)])


def test_fields_are_read_from_what_the_cli_prints():
    from simclr import cli
    result = {"protocol": "linear", "top1": 40.654, "top5": 89.6, "n_test": 2000, "n_train": 5000,
              "details": {"protocol_variant": "precomputed-features"}, "head_ckpt": "/r/checkpoints/linear-head.pt",
              "run_dir": "/r", "compare": {"linear": {"top1": 40.654}, "fast-linear": {"top1": 41.05},
                                           "difference": 0.4}}
    assert rc.read_fields(cli.summary(result)) == {"top1": "40.65", "top5": "89.60", "linear": "40.65",
                                                   "fast": "41.05"}
    baseline = cli.summary({**result, "kind": "baseline", "protocol": "knn", "compare": None, "head_ckpt": None,
                            "details": {"unlabeled_top1": 12.5}})
    assert rc.read_fields(baseline) == {"top1": "40.65", "top5": "89.60", "unlabeled": "12.50"}
    finetune = cli.summary({**result, "protocol": "linear+finetune", "details": {"protocol_variant": "finetune"},
                            "compare": None})
    assert rc.read_fields(finetune) == {"top1": "40.65", "top5": "89.60"}
    pretrain = ("run folder: logs/demo/x\nstatus: finished at step 300\nkNN top-1 at random init: 30.60%\n"
                "kNN top-1 after pretraining: 36.20% (top-5 87.80%)\n")
    assert rc.read_fields(pretrain) == {"init": "30.60", "after": "36.20", "after5": "87.80"}


def test_compare_skips_date_and_minutes_and_honours_the_tolerance(tmp_path):
    _, checks = rc.collect([_write(tmp_path)])
    measured = {"demo.init": "30.60", "demo.after": "36.25", "demo.after5": "87.80", "knn.top1": "36.20",
                "knn.top5": "87.80", "date": "2030-05-05", "demo.minutes": "9.9"}
    assert [(c.key, v) for c, v in rc.compare(checks, measured)] == [("demo.after", "36.25")]
    assert rc.compare(checks, measured, tolerance=0.05) == []
    with pytest.raises(rc.CheckError, match="did not print that field"):
        rc.compare(checks, {k: v for k, v in measured.items() if k != "knn.top5"})


def test_rewrite_replaces_only_the_marked_numbers_outside_code_blocks():
    measured = {"demo.init": "31.00", "knn.top1": "37.45", "date": "2030-05-05"}
    new = rc.rewrite(PAGE, measured)
    assert "31.00%<!-- check: demo.init -->" in new and "37.45<!-- check: knn.top1 -->" in new
    assert "2030-05-05<!-- check: date -->" in new
    assert "99.99<!-- check: knn.top1 -->" in new  # the example in the code block stays
    assert "`98.00<!-- check: knn.top5 -->`" in rc.rewrite(PAGE, {"knn.top5": "11.11"})  # and the one in a span
    assert new.replace("31.00", "30.60").replace("37.45", "36.20").replace("2030-05-05", "2026-01-01") == PAGE
    only = rc.rewrite(PAGE, measured, keys={"knn.top1"})
    assert "30.60%<!-- check: demo.init -->" in only and "2026-01-01" in only and "37.45<!-- check" in only


def test_main_fails_with_a_diff_and_update_rewrites(tmp_path, monkeypatch, capsys):
    page = _write(tmp_path)
    (tmp_path / "Makefile").write_text(f"demo: $(STAMP)\n\t$(BIN)/simclr pretrain --config {REPO}/configs/demo.yaml\n")
    monkeypatch.setattr(rc, "ROOT", tmp_path)
    monkeypatch.setattr(rc, "pages", lambda root=None: [page])
    measured = {"demo.init": "30.60", "demo.after": "36.65", "demo.after5": "87.80", "knn.top1": "36.65",
                "knn.top5": "87.80", "date": "2030-05-05", "demo.minutes": "4.2"}
    monkeypatch.setattr(rc, "run_all", lambda runs, makefile, keep=False: dict(measured))
    assert rc.main([]) == 1
    out = capsys.readouterr()
    assert "-`make demo` prints 30.60%<!-- check: demo.init --> -> 36.20%" in out.out
    assert "+`make demo` prints 30.60%<!-- check: demo.init --> -> 36.65%" in out.out
    assert "2030-05-05" not in out.out  # the date is not a difference
    assert "2 of 5 numbers differ" in out.err
    assert page.read_text() == PAGE  # checking writes nothing
    assert rc.main(["--update"]) == 0
    assert page.read_text() == rc.rewrite(PAGE, measured)
    assert "36.65<!-- check: knn.top1 -->" in page.read_text() and "4.2<!-- check: demo.minutes -->" in page.read_text()
    assert rc.main([]) == 0


def test_replay_reads_the_numbers_of_a_saved_run_of_the_script(tmp_path):
    runs, _ = rc.collect([_write(tmp_path)])
    log = ("\n$ make demo    [demo]\nstep 0 ...\nkNN top-1 at random init: 30.60%\n"
           "kNN top-1 after pretraining: 36.65% (top-5 87.80%)\n"
           "\n$ simclr knn --encoder_ckpt $ENC --seed 0    [knn]\n"
           "knn (precomputed-features): top-1 36.65%  top-5 87.80%  (2000 test images)\n"
           "\n$ simclr knn --encoder_ckpt $ENC --k 5    [old]\nknn: top-1 1.00%  top-5 2.00%\n")
    measured = rc.replay(log, runs)
    assert {k: v for k, v in measured.items() if "." in k} == {
        "demo.init": "30.60", "demo.after": "36.65", "demo.after5": "87.80", "knn.top1": "36.65", "knn.top5": "87.80"}
    runs["knn"] = "simclr knn --encoder_ckpt $ENC --seed 1"  # the command changed since: its numbers do not count
    assert "knn.top1" not in rc.replay(log, runs)


def test_a_declared_command_with_an_unknown_option_stops_before_anything_runs(tmp_path, monkeypatch, capsys):
    page = _write(tmp_path, "`simclr knn --augmentation none`\n<!-- run a: simclr knn --augmentation none -->\n")
    monkeypatch.setattr(rc, "pages", lambda root=None: [page])
    monkeypatch.setattr(rc, "run_all", lambda *a, **k: pytest.fail("ran a command that does not parse"))
    assert rc.main([]) == 2
    assert "belongs to `simclr eval`" in capsys.readouterr().err


def test_commands_get_their_variables_and_make_targets_their_recipe(tmp_path):
    mk = tmp_path / "Makefile"
    mk.write_text("demo: $(STAMP)\n\t$(BIN)/simclr pretrain --config configs/demo.yaml\n\ntest: lint\n\tx\n")
    assert rc.argv_of("make demo", {}, mk) == ["simclr", "pretrain", "--config", "configs/demo.yaml"]
    assert rc.argv_of("simclr knn --encoder_ckpt $ENC --k 20", {"ENC": "/a b/c.pt"}, mk) == [
        "simclr", "knn", "--encoder_ckpt", "/a b/c.pt", "--k", "20"]
    with pytest.raises(rc.CheckError, match=r"\$HEAD_linear is not set"):
        rc.argv_of("simclr eval --ckpt $HEAD_linear", {"ENC": "x"}, mk)
    with pytest.raises(rc.CheckError, match="no one-line recipe"):
        rc.argv_of("make nothing", {}, mk)


def test_variables_come_from_the_printed_run_folders_and_heads(tmp_path):
    run = tmp_path / "demo" / "r1"
    (run / "checkpoints").mkdir(parents=True)
    for step in (100, 300, 200):
        (run / "checkpoints" / f"checkpoint-{step:08d}.pt").write_bytes(b"")
    variables = {}
    rc.learn_variables("demo", f"run folder: {run}\n", variables)
    assert variables == {"ENC": str(run / "checkpoints" / "checkpoint-00000300.pt"), "RUN_demo": str(run)}
    rc.learn_variables("linear", f"linear head: /e/h.pt\nrun folder: {tmp_path / 'e'}\n", variables)
    assert variables["ENC"].endswith("checkpoint-00000300.pt")  # an eval run holds no checkpoints: ENC stays
    assert variables["HEAD_linear"] == "/e/h.pt"


@pytest.mark.parametrize("command, entry", [
    ("simclr runs --kind eval  # a comment", ("simclr", ["runs", "--kind", "eval"])),
    (".venv/bin/simclr report logs/demo/<run-id>", ("simclr", ["report", "logs/demo/<run-id>"])),
    ("torchrun --nproc_per_node 8 -m simclr pretrain --iters 2", ("simclr", ["pretrain", "--iters", "2"])),
    ("python train.py --config c.yaml | tee log", ("train.py", ["--config", "c.yaml"])),
    ("$ simclr runs", ("simclr", ["runs"])),
    ('pip install "simclr[wandb]"', None),
    ("continue with: simclr pretrain --resume x", None),
])
def test_commands_are_found_where_a_shell_would_run_them(command, entry):
    assert rc.entry_args(command) == entry


def test_the_option_check_refuses_what_the_cli_refuses():
    assert rc.option_errors("simclr knn --encoder_ckpt x --k 20 --knn_vote majority") == ""
    assert "belongs to `simclr eval`" in rc.option_errors("simclr knn --encoder_ckpt x --augmentation none")
    assert "unknown option 'bogus'" in rc.option_errors("python train.py --config configs/demo.yaml --bogus 1")
    assert "allowed" in rc.option_errors("simclr knn --knn_vote plurality")
    assert rc.option_errors("simclr pretrain --help") == ""


def _shown():
    return [(p.relative_to(REPO).as_posix(), c) for p in rc.pages(REPO) if p.is_file()
            for c in rc.shown_commands(p.read_text())]


def test_the_readme_shows_commands_and_declares_its_numbers():
    readme = (REPO / "README.md").read_text()
    assert len([c for page, c in _shown() if page == "README.md"]) >= 10
    runs, checks = rc.collect([REPO / "README.md"])
    assert "demo" in runs and len(checks) >= 10
    assert len(readme.splitlines()) <= 300


@pytest.mark.parametrize("page, command", _shown())
def test_every_shown_command_parses(page, command):
    assert rc.option_errors(command) == "", f"{page}: {command}"


def test_user_docs_name_no_tracker_numbers():
    for p in [*rc.pages(REPO)]:
        if p.is_file():
            assert not re.search(r"\bissues? #?\d+", p.read_text(), re.I), p
