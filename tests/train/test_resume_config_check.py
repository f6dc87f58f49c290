"""`--resume RUN` after a hand-edit of RUN/config.yaml: one line naming the file, both values and the fix (not the
command that failed), through the real CLI on a real run folder."""
from __future__ import annotations

from pathlib import Path


from tests.helpers.folder_runs import cli, one_error, one_run as run_folder_of, tiny_data_setup


_DATA: list = []


_setup = tiny_data_setup(_DATA)


def one_run(tmp_path: Path, **over) -> Path:
    return run_folder_of(_DATA[0], tmp_path, **over)


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
