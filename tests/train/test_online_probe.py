"""--online_probe: the encoder trains exactly as without it, its logged accuracy is the one a replay of the probe
computes before its update, a resumed run ends bit-identical to an uninterrupted one, the index shows its last
value, and images without labels are refused. (Two processes: tests/distributed/test_data_parallel.py.)"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_args
from simclr import cli
from simclr import config as config_lib
from simclr.checkpoint import checkpoint_path
from simclr.checkpoint import read as read_checkpoint
from simclr.data import get_dataset
from simclr.data.loaders import build_loader
from simclr.gradcache import chunk_rows
from simclr.models import build_model
from simclr.options import PretrainConfig
from simclr.runs import index, read_metrics
from simclr.train import pretrain
from tests.checkpoint.test_crash_safety import tiny_cifar_folder

ITERS = 4


@pytest.fixture(scope="module")
def folder(data_root, tmp_path_factory) -> Path:
    return tiny_cifar_folder(tmp_path_factory.mktemp("tiny-cifar"), data_root)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels in every run of this module: bit-exact comparisons
    yield
    torch.set_num_threads(n)


def cfg(tmp: Path, folder: Path, **over) -> PretrainConfig:
    """64 real CIFAR-10 images of 4 classes, batch 16, ResNet-18 of width 8, deterministic, every step logged and
    saved."""
    base = dict(data="folder", data_path=folder, image_size=32, train_subset=0, test_subset=0, batch_size=16,
                iters=ITERS, knn_k=20, deterministic="true", save_freq=1, keep_last=10, logger="none")
    base.update(over)
    c, _ = config_lib.parse(PretrainConfig, tiny_args(tmp, **base))
    return c


def final(run: Path) -> dict:
    return read_checkpoint(checkpoint_path(run, ITERS))


def assert_equal_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys() and a, what
    for k in a:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), f"{what}: {k} differs"


def optimizer_tensors(opt_state: dict) -> dict:
    return {f"{i}/{k}": v for i, st in opt_state["state"].items() for k, v in st.items()}


@pytest.mark.parametrize("chunks", [0, 2])
def test_the_probe_leaves_the_encoder_bit_identical_and_scores_before_its_update(tmp_path, folder, chunks):
    off = pretrain(cfg(tmp_path / "off", folder, grad_cache_chunks=chunks))
    on = pretrain(cfg(tmp_path / "on", folder, grad_cache_chunks=chunks, online_probe="true"))
    a, b = final(Path(off["run_dir"])), final(Path(on["run_dir"]))
    assert "probe" not in a and b["probe"]["head"]["weight"].abs().sum() > 0  # it trained
    assert_equal_tensors(a["model"], b["model"], "encoder weights and BN statistics")
    assert_equal_tensors(optimizer_tensors(a["optimizer"]), optimizer_tensors(b["optimizer"]), "LARS state")

    run = Path(on["run_dir"])
    logged = {m["step"]: m["online_linear_top1"] for m in read_metrics(run) if "online_linear_top1" in m}
    assert sorted(logged) == list(range(1, ITERS + 1))
    # replay: the batch of step k, the encoder and probe as checkpoint k left them, the probe's top-1 on the
    # first view (in train mode, as the step ran it). Step 0's probe is all zeros: argmax is class 0.
    c = cfg(tmp_path / "replay", folder)
    images = get_dataset("folder", "pretrain", str(folder), 32)
    loader = build_loader(c, images, torch.device("cpu"))
    for k in range(ITERS):
        x, y = next(iter(loader.batches(k, k + 1)))
        if k == 0:
            want = 100.0 * (y == 0).double().mean().item()
        else:
            ck = read_checkpoint(checkpoint_path(run, k))
            model = build_model(c, 32)
            model.load_state_dict(ck["model"])
            model.train()
            with torch.no_grad():
                if chunks:  # the features of the gradient cache's graph-free pass: batch norm per chunk
                    h = torch.empty(len(x), model.feat_dim)
                    for rows in chunk_rows(len(y), 2, chunks):
                        h[rows] = model(x[rows])["h"]
                else:
                    h = model(x)["h"]
                logits = torch.nn.functional.linear(h[: len(y)], ck["probe"]["head"]["weight"],
                                                    ck["probe"]["head"]["bias"])
            want = 100.0 * (logits.argmax(1) == y).double().mean().item()
        assert logged[k + 1] == pytest.approx(want, abs=1e-9), f"step {k + 1}"

    row = index(tmp_path / "on" / "logs").iloc[0]
    assert row["online_linear_top1"] == logged[ITERS]


def test_a_resumed_run_with_the_probe_ends_bit_identical(tmp_path, folder):
    full = pretrain(cfg(tmp_path / "full", folder, online_probe="true"))
    part = pretrain(cfg(tmp_path / "part", folder, online_probe="true", stop_after=2))
    assert part["status"] == "interrupted" and part["step"] == 2
    resumed = pretrain(cfg(tmp_path / "part", folder, online_probe="true", resume=part["run_dir"]))
    assert resumed["step"] == ITERS and resumed["run_dir"] == part["run_dir"]
    a, b = final(Path(full["run_dir"])), final(Path(part["run_dir"]))
    assert_equal_tensors(a["model"], b["model"], "encoder")
    assert_equal_tensors(optimizer_tensors(a["optimizer"]), optimizer_tensors(b["optimizer"]), "LARS state")
    assert_equal_tensors(a["probe"]["head"], b["probe"]["head"], "probe head")
    assert_equal_tensors(optimizer_tensors(a["probe"]["optimizer"]), optimizer_tensors(b["probe"]["optimizer"]),
                         "probe momentum")
    probe = [[(m["step"], m["online_linear_top1"]) for m in read_metrics(Path(r["run_dir"]))
              if "online_linear_top1" in m] for r in (full, part)]
    assert probe[0] == probe[1]


def test_the_probe_without_labels_is_refused_before_anything_is_written(tmp_path, folder, capsys):
    one_class = tmp_path / "one"
    for split in ("train", "test"):
        (one_class / split).mkdir(parents=True)
        (one_class / split / "cat").symlink_to(folder / split / "cat")
    argv = tiny_args(tmp_path, data="folder", data_path=one_class, image_size=32, train_subset=0, test_subset=0,
                     batch_size=8, online_probe="true")
    assert cli.main(["pretrain", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --online_probe true needs class labels"), err
    assert not (tmp_path / "logs").exists()
