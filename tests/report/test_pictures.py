"""simclr.report.pictures: the report reads a run's checkpoints as every reader does, pinned."""
from __future__ import annotations

from simclr import checkpoint
from simclr.report.pictures import load_run_encoder


def test_a_checkpoint_pruned_while_the_report_reads_is_passed_over_not_called_corrupt(trained_run, monkeypatch, said):
    newest = sorted((trained_run / "checkpoints").glob("checkpoint-*.pt"))[-1]
    vanished = newest.with_name("checkpoint-00000005.pt")  # listed, then pruned by the training run
    monkeypatch.setattr(checkpoint, "list_checkpoints", lambda run: [vanished, newest])
    encoder, path = load_run_encoder(trained_run, {})
    assert encoder is not None and path == newest and said() == []


def test_the_checkpoint_being_read_is_held_against_pruning(trained_run, monkeypatch):
    """While the report reads a checkpoint, a save's prune (keep_last 1) leaves it."""
    newest = sorted((trained_run / "checkpoints").glob("checkpoint-*.pt"))[-1]
    oldest = sorted((trained_run / "checkpoints").glob("checkpoint-*.pt"))[0]
    monkeypatch.setattr(checkpoint, "list_checkpoints", lambda run: [oldest])
    import simclr.weights as weights
    real = weights.load_encoder

    def load_while_a_save_prunes(p, *a, **k):
        checkpoint.prune(trained_run, 1)
        return real(p, *a, **k)
    monkeypatch.setattr(weights, "load_encoder", load_while_a_save_prunes)
    encoder, path = load_run_encoder(trained_run, {})
    assert encoder is not None and path == oldest and oldest.exists() and newest.exists()
