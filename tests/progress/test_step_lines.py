"""simclr.progress as pretraining uses it off a terminal (a pipe, SLURM): the step lines carry the loss."""
from __future__ import annotations

import logging

from tests.conftest import run_cli, tiny_args


def test_the_bars_alive_line_never_repeats_a_stale_loss(tmp_path, data_root, monkeypatch):
    from simclr import progress
    monkeypatch.setattr(progress, "EVERY", 0.0)  # the "still alive" line after every step
    r = run_cli("pretrain", *tiny_args(tmp_path, iters=4, log_freq=2, verbose="true"))
    assert r.returncode == 0, r.stderr[-2000:]
    alive = [ln for ln in r.stderr.splitlines() if " pretrain: " in ln and "/4" in ln]
    steps = [ln for ln in r.stderr.splitlines() if " step 2/4 " in ln or " step 4/4 " in ln]
    assert alive and len(steps) == 2  # both kinds of lines were written ...
    assert not [ln for ln in alive if "loss" in ln]  # ... and only the step lines speak of the loss
    assert all("loss" in ln for ln in steps)


def test_a_bar_does_not_repeat_where_it_ended_after_a_message_said_so(capsys):
    from simclr import progress
    bar = progress.Progress(3, "work", file=None, every=1e9)
    bar.t0 -= 5  # it took time
    bar.update(3)
    logging.getLogger("simclr.train").info("step 3/3 done")  # a message, as the step line is
    bar.close()
    err = capsys.readouterr().err
    assert "step 3/3 done" in err and "work: 3/3" not in err
    quiet = progress.Progress(3, "quiet", every=1e9)
    quiet.t0 -= 5
    quiet.update(3)
    quiet.close()  # nothing said after the last update: the bar says where it ended
    assert "quiet: 3/3 (100%)" in capsys.readouterr().err
