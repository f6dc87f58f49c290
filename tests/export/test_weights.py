"""Weights as artifacts: the spec's checkpoint layout, exports, safe loading, clear errors.

References are independent of our code: torchvision's own ResNets (pooled features with
``fc = Identity``), a hand-built projection head, hashlib for checksums, constant images.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import simclr
from simclr import cli
from simclr.checkpoint import save_checkpoint
from simclr.errors import CheckpointError
from simclr.export import card_path, export_encoder, files_list_path
from simclr.models import SimCLRModel
from simclr.weights import load_encoder, load_linear_head



# ----------------------------------------------------------------------------------------------
# building checkpoints the way the spec's code saves them
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def _randomise_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics, so eval-mode features depend on every buffer being loaded."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.num_batches_tracked.fill_(1234)


def torchvision_resnet(arch: str, cifar_stem: bool, seed: int = 0) -> nn.Module:
    """torchvision's ResNet, with the spec's CIFAR stem patched in; its 1000-way fc is kept (unused)."""
    torch.manual_seed(seed)
    m = getattr(torchvision.models, arch)()
    if cifar_stem:
        m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        m.maxpool = nn.Identity()
    _randomise_bn(m, seed)
    return m.eval()


def spec_head(d: int, out: int = 128, seed: int = 1) -> nn.Sequential:
    """The spec's projection head: fc1 (d x d) -> bn1 -> ReLU -> fc2 (out x d) -> bn2."""
    torch.manual_seed(seed)
    head = nn.Sequential(OrderedDict([("fc1", nn.Linear(d, d, bias=False)), ("bn1", nn.BatchNorm1d(d)),
                                      ("relu1", nn.ReLU()), ("fc2", nn.Linear(d, out, bias=False)),
                                      ("bn2", nn.BatchNorm1d(out))]))
    _randomise_bn(head, seed)
    return head.eval()


def spec_checkpoint(path: Path, trunk: nn.Module, head: nn.Module, **hparams) -> Path:
    sd = OrderedDict((f"convnet.{k}", v) for k, v in trunk.state_dict().items())
    sd.update((f"projection.{k}", v) for k, v in head.state_dict().items())
    hp = argparse.Namespace(**{"problem": "sim-clr", "temperature": 0.5, "batch_size": 1024, "iters": 48828,
                               **hparams})
    torch.save({"state_dict": sd, "hparams": hp, "iter": 48828}, path)
    return path


def pooled(tv_model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's own forward up to the pooled features (fc replaced by Identity on a copy)."""
    fc = tv_model.fc
    tv_model.fc = nn.Identity()
    try:
        with torch.no_grad():
            return tv_model(x)
    finally:
        tv_model.fc = fc


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def spec18(tmp_path_factory):
    """The spec's layout, ResNet-18 with the CIFAR stem (width 64: torchvision has no other)."""
    d = tmp_path_factory.mktemp("spec18")
    trunk, head = torchvision_resnet("resnet18", cifar_stem=True), spec_head(512)
    path = spec_checkpoint(d / "resnet18_cifar10.pth.tar", trunk, head, arch="resnet18", data="cifar")
    return path, trunk, head


def tiny_model(seed: int = 0, cifar_stem: bool = True) -> SimCLRModel:
    torch.manual_seed(seed)
    m = SimCLRModel("resnet18", cifar_stem=cifar_stem, width=8)
    _randomise_bn(m, seed)
    return m.eval()


def our_checkpoint(path: Path, model, image_size: int = 32, arch="resnet18", width=8) -> Path:
    """A checkpoint in the layout the trainer writes (kind, step, image_size, config, model, metrics) + card."""
    cfg = {"arch": arch, "width": width, "data": "cifar10", "image_size": 0, "iters": 40, "batch_size": 32,
           "temperature": 0.5, "proj_layers": 2, "proj_dim": 128}
    metrics = {"loss": 3.21, "knn_top1": 41.5}
    save_checkpoint(path, {"kind": "pretrain", "step": 40, "image_size": image_size, "config": cfg,
                           "model": model if isinstance(model, dict) else model.state_dict(), "metrics": metrics},
                    {"arch": arch, "width": width, "data": "cifar10", "image_size": image_size, "epochs": 5.0,
                     "metrics": metrics})
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model = tiny_model()
    return our_checkpoint(d / "checkpoint-00000040.pt", model), model


def tiny_spec_state(seed: int = 0) -> OrderedDict:
    """The spec's key layout at width 8 (our ResNet has torchvision's names) + an unused 1000-way fc."""
    m = tiny_model(seed)
    sd = OrderedDict((f"convnet.{k}", v) for k, v in m.convnet.state_dict().items())
    sd["convnet.fc.weight"], sd["convnet.fc.bias"] = torch.zeros(1000, 64), torch.zeros(1000)
    sd.update((f"projection.{k}", v) for k, v in m.projection.state_dict().items())
    return sd


# ----------------------------------------------------------------------------------------------
# loading the spec's layout
# ----------------------------------------------------------------------------------------------

def test_spec_layout_resnet18_cifar_gives_torchvision_features(spec18):
    path, trunk, head = spec18
    sd = torch.load(path, weights_only=False)["state_dict"]
    assert "convnet.fc.weight" in sd and "projection.bn1.num_batches_tracked" in sd  # the layout under test
    enc = simclr.load_encoder(path)
    assert (enc.arch, enc.feat_dim, enc.input_size, enc.cifar_stem, enc.has_head) == ("resnet18", 512, 32, True, True)
    assert not enc.training and enc.info["data"] == "cifar"
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = enc(x)
        z = enc.encode(x, "z")
    ref_h = pooled(trunk, x)
    assert h.shape == (3, 512) and same(h, ref_h)
    with torch.no_grad():
        assert same(z, head(ref_h))
    # the head's buffers came through too (incl. num_batches_tracked)
    assert int(enc.model.projection.bn1.num_batches_tracked) == 1234


def test_spec_layout_imagenet_stem(tmp_path):
    trunk, head = torchvision_resnet("resnet18", cifar_stem=False, seed=3), spec_head(512, seed=4)
    path = spec_checkpoint(tmp_path / "resnet18_imagenet.pth.tar", trunk, head, arch="resnet18", data="imagenet")
    enc = load_encoder(path)
    assert (enc.input_size, enc.cifar_stem) == (224, False)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert same(enc(x), pooled(trunk, x))


def test_spec_resnet50_cifar_load_and_torchvision_recipe(tmp_path):
    """The released files' exact case: arch 'ResNet50', data 'cifar'; export; the card's recipe loads strict."""
    trunk, head = torchvision_resnet("resnet50", cifar_stem=True, seed=5), spec_head(2048, seed=6)
    path = spec_checkpoint(tmp_path / "resnet50_cifar10_bs1024_epochs1000.pth.tar", trunk, head,
                           arch="ResNet50", data="cifar")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref = pooled(trunk, x)
    enc = load_encoder(path)
    assert (enc.arch, enc.feat_dim, enc.input_size) == ("resnet50", 2048, 32)
    with torch.no_grad():
        assert same(enc(x), ref)
    out = tmp_path / "resnet50_simclr.pth"
    card = export_encoder(path, out, "torchvision")
    # the documented recipe, run as written (torchvision's CIFAR-stem patch, then strict load)
    env = {"torch": torch, "torchvision": torchvision}
    exec("\n".join(card["torchvision_recipe"]).replace("PATH", repr(str(out))), env)
    m = env["m"].eval()
    with torch.no_grad():
        assert same(m(x), ref)
    assert card["arch"] == "resnet50" and card["input_size"] == 32 and card["data"] == "cifar10"


def test_imagenet_stem_export_loads_into_plain_torchvision_resnet50(tmp_path):
    trunk, head = torchvision_resnet("resnet50", cifar_stem=False, seed=7), spec_head(2048, seed=8)
    sd = {f"convnet.{k}": v for k, v in trunk.state_dict().items() if not k.startswith("fc.")}
    sd.update({f"projection.{k}": v for k, v in head.state_dict().items()})
    ck = our_checkpoint(tmp_path / "checkpoint-00000040.pt", sd, image_size=224, arch="resnet50", width=64)
    out = tmp_path / "exports" / "resnet50_simclr.pth"
    assert cli.main(["export", str(ck), "--format", "torchvision", "--out", str(out)]) == 0
    m = torchvision.models.resnet50()
    m.fc = nn.Identity()  # "after dropping fc"
    m.load_state_dict(torch.load(out, weights_only=True), strict=True)
    m.eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert same(m(x), pooled(trunk, x))
    card = json.loads(card_path(out).read_text())
    assert card["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert (card["arch"], card["input_size"], card["cifar_stem"], card["torchvision_loadable"]) == \
        ("resnet50", 224, False, True)


# ----------------------------------------------------------------------------------------------
# our checkpoints, exports, round trips
# ----------------------------------------------------------------------------------------------

def test_our_checkpoint_export_roundtrips(tiny, tmp_path):
    ck, model = tiny
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_h, ref_z = model.convnet(x), model(x)["z"]
    enc = load_encoder(ck)
    assert (enc.arch, enc.width, enc.input_size) == ("resnet18", 8, 32)
    assert enc.card["step"] == 40 and enc.card["metrics"]["knn_top1"] == 41.5
    with torch.no_grad():
        assert torch.equal(enc(x), ref_h)

    pth, st, st_head = tmp_path / "enc.pth", tmp_path / "enc.safetensors", tmp_path / "head.safetensors"
    c1 = export_encoder(ck, pth, "torchvision")
    c2 = export_encoder(ck, st, "safetensors")
    export_encoder(ck, st_head, "safetensors", include_head=True)
    # separate cards for the same stem; each names and hashes its own file
    for out, card in ((pth, c1), (st, c2)):
        on_disk = json.loads(card_path(out).read_text())
        assert on_disk["file"] == out.name and on_disk["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
        assert (on_disk["arch"], on_disk["width"], on_disk["data"], on_disk["input_size"]) == \
            ("resnet18", 8, "cifar10", 32)
        assert on_disk["metrics"] == {"loss": 3.21, "knn_top1": 41.5} and on_disk["epochs"] == 5.0
        assert on_disk["source"]["sha256"] == hashlib.sha256(ck.read_bytes()).hexdigest()
        assert on_disk["torchvision_loadable"] is False  # width 8
    # both formats hold exactly the trunk's tensors under torchvision's names
    a, b = torch.load(pth, weights_only=True), load_file(str(st))
    assert set(a) == set(b) == set(model.convnet.state_dict())
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], model.convnet.state_dict()[k]) for k in a)
    for f in (pth, st, st_head):
        e = load_encoder(f)
        assert e.input_size == 32
        with torch.no_grad():
            assert torch.equal(e(x), ref_h)
    e = load_encoder(st_head)
    assert e.has_head and not load_encoder(st).has_head
    with torch.no_grad():
        assert torch.equal(e.encode(x, "z"), ref_z)
    with pytest.raises(CheckpointError, match="no projection head"):
        load_encoder(st).encode(x, "z")
    # an export of an export is the same file content
    again = tmp_path / "again.safetensors"
    export_encoder(st, again, "safetensors")
    assert load_file(str(again)).keys() == b.keys()


def test_encoder_rejects_wrong_input(tiny):
    enc = simclr.load_encoder(tiny[0])
    with pytest.raises(ValueError, match="float"):
        enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="N, 3, H, W"):
        enc(torch.zeros(3, 32, 32))


def test_linear_head_loader(tmp_path):
    w, b = torch.randn(10, 2048), torch.randn(10)
    path = tmp_path / "resnet50_cifar10_bs1024_epochs1000_linear.pth.tar"
    torch.save({"state_dict": {"weight": w, "bias": b}, "hparams": argparse.Namespace(arch="linear", data="cifar")},
               path)
    w2, b2, info = load_linear_head(path)
    assert torch.equal(w2, w) and torch.equal(b2, b) and info["arch"] == "linear"
    with pytest.raises(CheckpointError, match="not a linear-evaluation head"):
        load_linear_head(spec_ckpt_tiny(tmp_path))


# ----------------------------------------------------------------------------------------------
# safety and bad files
# ----------------------------------------------------------------------------------------------

def spec_ckpt_tiny(d: Path, name="tiny.pth.tar", **over) -> Path:
    payload = {"state_dict": tiny_spec_state(), "hparams": argparse.Namespace(arch="resnet18", data="cifar")}
    payload.update(over)
    path = d / name
    torch.save(payload, path)
    return path


def _bad_files(d: Path) -> dict:
    """name -> (path, phrase the error must contain)."""
    good = spec_ckpt_tiny(d, "good.pth.tar")
    raw = good.read_bytes()
    out = {}
    p = d / "truncated.pth.tar"
    p.write_bytes(raw[: len(raw) // 2])
    out["truncated"] = (p, "truncated")
    p = d / "random.pth.tar"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    out["random bytes"] = (p, "neither a PyTorch checkpoint nor a safetensors")
    p = d / "empty.pth.tar"
    p.write_bytes(b"")
    out["empty"] = (p, "empty")
    sd = tiny_spec_state()
    del sd["convnet.layer2.0.conv1.weight"]
    out["missing trunk key"] = (spec_ckpt_tiny(d, "missing.pth.tar", state_dict=sd),
                                "missing keys convnet.layer2.0.conv1.weight")
    sd = tiny_spec_state()
    del sd["projection.bn2.running_var"]
    out["missing head key"] = (spec_ckpt_tiny(d, "missing_head.pth.tar", state_dict=sd),
                               "missing keys projection.bn2.running_var")
    out["wrong architecture"] = (spec_ckpt_tiny(d, "wrong_arch.pth.tar",
                                                hparams=argparse.Namespace(arch="ResNet50", data="cifar")),
                                 "wrong architecture")
    sd = tiny_spec_state()
    sd.update({k.replace("layer3.1.", "layer3.2."): v.clone() for k, v in sd.items() if ".layer3.1." in k})
    out["unsupported depth"] = (spec_ckpt_tiny(d, "deeper.pth.tar", state_dict=sd), "unsupported architecture")
    sd = tiny_spec_state()
    sd["projection.fc1.weight"] = torch.zeros(32, 64)
    out["misshapen tensor"] = (spec_ckpt_tiny(d, "shape.pth.tar", state_dict=sd), "has shape (32, 64)")
    out["linear head (spec)"] = (spec_ckpt_tiny(d, "x_linear.pth.tar", state_dict={"weight": torch.zeros(10, 64),
                                                                                  "bias": torch.zeros(10)},
                                                hparams=argparse.Namespace(arch="linear", data="cifar")),
                                 "linear-evaluation head")
    p = d / "plain_linear.pt"
    torch.save({"weight": torch.zeros(10, 64), "bias": torch.zeros(10)}, p)
    out["linear head (plain)"] = (p, "linear-evaluation head")
    p = d / "not_a_dict.pt"
    torch.save([torch.zeros(2)], p)
    out["not a dict"] = (p, "does not hold a checkpoint dict")
    p = d / "other_model.pt"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3), "classifier.weight": torch.zeros(10, 8)}, p)
    out["not a resnet"] = (p, "no ResNet encoder weights")
    st = d / "enc.safetensors"
    export_encoder(good, st, "safetensors")
    p = d / "cut.safetensors"
    p.write_bytes(st.read_bytes()[:-1000])
    out["truncated safetensors"] = (p, "not a readable safetensors file")
    p = d / "flipped.safetensors"
    data = bytearray(st.read_bytes())
    data[-10] ^= 0xFF
    p.write_bytes(bytes(data))
    shutil.copy(card_path(st), card_path(p))
    card = json.loads(card_path(p).read_text())
    card["file"] = p.name
    card_path(p).write_text(json.dumps(card))
    out["checksum mismatch"] = (p, "does not match the SHA-256")
    out["missing file"] = (d / "nope.pth.tar", "not found")
    return out


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return _bad_files(tmp_path_factory.mktemp("bad"))


BAD = ["truncated", "random bytes", "empty", "missing trunk key", "missing head key", "wrong architecture",
       "unsupported depth", "misshapen tensor", "linear head (spec)", "linear head (plain)", "not a dict",
       "not a resnet", "truncated safetensors", "checksum mismatch", "missing file"]


@pytest.mark.parametrize("case", BAD)
def test_bad_file_clear_error(bad_files, case):
    path, phrase = bad_files[case]
    with pytest.raises(CheckpointError) as err:
        load_encoder(path)
    msg = str(err.value)
    assert str(path) in msg and phrase in msg and "\n" not in msg


def test_legacy_torch_format_and_dataparallel_prefix(tmp_path):
    """Files saved by torch < 1.6 (non-zip) and state dicts saved from nn.DataParallel (``module.``)."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ref = load_encoder(spec_ckpt_tiny(tmp_path, "zip.pth.tar"))
    legacy = tmp_path / "legacy.pth.tar"
    torch.save({"state_dict": OrderedDict((f"module.{k}", v) for k, v in tiny_spec_state().items()),
                "hparams": argparse.Namespace(arch="resnet18", data="cifar")}, legacy,
               _use_new_zipfile_serialization=False)
    with torch.no_grad():
        assert torch.equal(load_encoder(legacy)(x), ref(x))
    cut = tmp_path / "legacy_cut.pth.tar"
    cut.write_bytes(legacy.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_encoder(cut)


def test_expected_arch_mismatch(tiny):
    with pytest.raises(CheckpointError, match="wrong architecture"):
        load_encoder(tiny[0], arch="resnet50")
    assert load_encoder(tiny[0], arch="resnet18").arch == "resnet18"


@pytest.mark.parametrize("command", ["embed", "export"])
def test_bad_files_through_cli(bad_files, tmp_path, capsys, command):
    """Every bad file: exit code 2, one `error:` line naming the file, no traceback, no output written."""
    for case in BAD:
        path = bad_files[case][0]
        out = tmp_path / ("f.npy" if command == "embed" else "e.pth")
        argv = (["embed", "--encoder_ckpt", str(path), "--images", str(tmp_path), "--out", str(out)]
                if command == "embed" else ["export", str(path), "--out", str(out)])
        assert cli.main(argv) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("error:") and str(path) in err and "Traceback" not in err, case
        assert not out.exists(), case
    assert cli.main([command]) == 2
    assert ("missing CKPT" if command == "export" else "'encoder_ckpt' is required") in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# embed
# ----------------------------------------------------------------------------------------------

def _image_dir(root: Path, data_root: Path) -> tuple[Path, list]:
    imgs = root / "imgs"
    src = sorted((data_root / "cifar10" / "test" / "cat").iterdir())[:3] + \
        sorted((data_root / "cifar10" / "test" / "ship").iterdir())[:2]
    names = []
    for i, f in enumerate(src):
        rel = Path("b" if i < 3 else "a/deep") / f.name
        (imgs / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, imgs / rel)
        names.append(rel.as_posix())
    # a non-square, larger image of one colour: any resize + crop gives that colour at 32x32
    Image.new("RGB", (48, 40), (200, 100, 50)).save(imgs / "c.png")
    names.append("c.png")
    (imgs / "notes.txt").write_text("not an image")
    return imgs, sorted(names)


def test_embed_rows_and_file_list(tiny, tmp_path, data_root, capsys):
    ck, model = tiny
    imgs, names = _image_dir(tmp_path, data_root)
    out = tmp_path / "features.npy"
    assert cli.main(["embed", "--encoder_ckpt", str(ck), "--images", str(imgs), "--out", str(out),
                     "--batch_size", "4"]) == 0
    feats = np.load(out)
    listed = files_list_path(out).read_text().splitlines()
    assert files_list_path(out).name == "features.files.txt"
    assert listed == names and feats.shape == (len(names), 64) and feats.dtype == np.float32
    for i, name in enumerate(listed):
        if name.endswith(".jpg"):  # already 32x32: used as is
            x = torch.from_numpy(np.array(Image.open(imgs / name).convert("RGB"))).permute(2, 0, 1)
        else:
            x = torch.tensor([200, 100, 50], dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32)
        with torch.no_grad():
            ref = model.convnet(x[None].float() / 255)[0].numpy()
        np.testing.assert_allclose(feats[i], ref, rtol=0, atol=1e-5)
    # a broken image: an error naming it, or skipped (and left out of both files) on request
    (imgs / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    capsys.readouterr()
    assert cli.main(["embed", "--encoder_ckpt", str(ck), "--images", str(imgs), "--out", str(out)]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert cli.main(["embed", "--encoder_ckpt", str(ck), "--images", str(imgs), "--out", str(out),
                     "--skip_bad_images", "true"]) == 0
    assert np.array_equal(np.load(out), feats) and files_list_path(out).read_text().splitlines() == names
    assert cli.main(["embed", "--encoder_ckpt", str(ck), "--images", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "image folder not found" in capsys.readouterr().err


def test_pretrain_export_embed_end_to_end(trained_ckpt, tmp_path, data_root):
    """The trainer's real checkpoint (conftest's session run) -> export (both formats) -> embed; features agree
    across formats."""
    ck = trained_ckpt
    st = tmp_path / "enc.safetensors"
    assert cli.main(["export", str(ck), "--format", "safetensors", "--out", str(st)]) == 0
    card = json.loads(card_path(st).read_text())
    assert (card["arch"], card["width"], card["data"], card["step"], card["input_size"]) == \
        ("resnet18", 8, "cifar10", 4, 32)
    assert "knn_top1" in card["metrics"]
    imgs, names = _image_dir(tmp_path, data_root)
    f1, f2 = tmp_path / "a.npy", tmp_path / "b.npy"
    assert cli.main(["embed", "--encoder_ckpt", str(ck), "--images", str(imgs), "--out", str(f1)]) == 0
    assert cli.main(["embed", "--encoder_ckpt", str(st), "--images", str(imgs), "--out", str(f2)]) == 0
    assert np.array_equal(np.load(f1), np.load(f2)) and np.load(f1).shape == (len(names), 64)


def test_load_encoder_gives_a_frozen_feature_extractor_unless_asked_for_a_trainable_one(trained_ckpt):
    import simclr
    x = torch.rand(2, 3, 32, 32)
    enc = simclr.load_encoder(trained_ckpt)
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc(x).requires_grad  # no graph, even outside torch.no_grad()
    trainable = simclr.load_encoder(trained_ckpt, frozen=False)
    h = trainable(x)
    assert h.requires_grad
    torch.testing.assert_close(h.detach(), enc(x))  # the same weights either way
