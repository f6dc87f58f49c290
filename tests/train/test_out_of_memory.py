"""What does not fit is one line: weights of another shape, a batch beyond the memory there is."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import torch
from tests.helpers.folder_runs import cli, one_error, tree_digest

from simclr.train import loop


def _eval_args(root, *extra) -> list:
    return ["eval", "--data", "cifar10", "--train_subset", 40, "--test_subset", 20, "--workers", 0, "--device", "cpu",
            "--root", root, "--verbose", "false", "--cache_features", "false", *extra]


def test_a_finetuned_head_with_an_encoder_of_another_width_is_one_line(tmp_path, trained_ckpt):
    rc, out, err = cli(*_eval_args(tmp_path / "runs", "--name", "ft", "--encoder_ckpt", trained_ckpt,
                                   "--finetune", "true", "--iters", 1, "--batch_size", 20))
    assert rc == 0, err
    (head,) = (tmp_path / "runs" / "ft").glob("*/checkpoints/finetuned.pt")
    assert "encoder" in torch.load(head, weights_only=True)  # a fine-tuned result carries its encoder
    # the head's encoder is a width-8 ResNet-18; a width-16 one (random init) and the saved weights do not fit
    rc, out, err = cli(*_eval_args(tmp_path / "runs", "--name", "again", "--eval_only", "true", "--ckpt", head,
                                   "--encoder_arch", "resnet18", "--encoder_width", 16))
    line = one_error(rc, err, str(head), "fine-tuned encoder", "[8, 3, 3, 3] there, [16, 3, 3, 3] here",
                     f"--encoder_ckpt ({trained_ckpt})")
    assert "size mismatch" not in line
    assert not (tmp_path / "runs" / "again").exists()  # refused before any folder was made


def test_an_out_of_memory_step_is_one_line_and_the_checkpoints_stay(interrupted_run, monkeypatch):
    """A device allocator's error (CUDA's type, raised in the step after the resume) is one line naming the
    batch size, --grad_cache_chunks and the model; the checkpoints saved before it are untouched."""
    before = tree_digest(interrupted_run / "checkpoints")

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(loop, "train_step", no_memory)  # the step as the loop calls it
    rc, out, err = cli("pretrain", "--resume", interrupted_run)
    line = one_error(rc, err, "out of memory", "--batch_size", "--grad_cache_chunks K", "resnet18 width 8")
    assert "Traceback" not in err and "Tried to allocate" not in line
    assert f"--resume {interrupted_run}" in err  # how to continue once it fits
    assert tree_digest(interrupted_run / "checkpoints") == before
    status = (interrupted_run / "status.json").read_text()
    assert '"failed"' in status and "out of memory" in status


# A real process whose address space is capped at 5 GiB (torch itself needs about 3): the CPU allocator then
# refuses a batch of 8,192 pairs through a width-8 ResNet-18 (about 10 GiB of activations).
_CAPPED = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (5 << 30, 5 << 30))
    from simclr.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _capped(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CAPPED, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # a real process or a long wait: `make test` runs it, `make test-fast` leaves it out
def test_a_batch_beyond_the_memory_is_one_line_in_a_real_process(tmp_path):
    p = _capped("pretrain", "--data", "cifar10", "--arch", "resnet18", "--width", 8, "--train_subset", 8192,
                "--test_subset", 100, "--batch_size", 8192, "--iters", 2, "--eval_freq", 0, "--save_freq", 0,
                "--workers", 0, "--device", "cpu", "--root", tmp_path / "runs", "--name", "big", "--verbose", "false")
    one_error(p.returncode, p.stderr, "out of memory on cpu", "--batch_size 8192 x 2 views of 32px",
              "resnet18 width 8", "--grad_cache_chunks K")
    p = _capped("knn", "--data", "cifar10", "--encoder_arch", "resnet50", "--train_subset", 3000, "--test_subset", 100,
                "--test_bs", 3000, "--workers", 0, "--device", "cpu", "--root", tmp_path / "runs", "--name", "k",
                "--verbose", "false", "--cache_features", "false")
    line = one_error(p.returncode, p.stderr, "out of memory on cpu", "--test_bs 3000")
    assert "--batch_size" not in line  # kNN trains nothing: only the extraction batch matters
