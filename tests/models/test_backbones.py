"""Backbones: every built-in ResNet depth, the papers' width multiplier, the ImageNet configs of the SimCLR papers,
and any timm model (``--arch timm:<name>``) through pretraining, resume, kNN, export and the run index.

References are independent of the code under test: torchvision's models (parameter names and shapes), the
official SimCLR tables (parameter counts), timm itself (pooled features, its weight-decay groups, loading an
export with ``timm.create_model``) and the run's own kNN monitor at step 0 (the random-init baseline).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from tests.conftest import REPO, run_cli, tiny_args
from simclr import config as config_lib
from simclr.errors import ConfigError
from simclr.models import ResNet, SimCLRModel, build_model, convert_sync_batchnorm
from simclr.loss import nt_xent
from simclr.optim import build_optimizer, param_groups
from simclr.options import PretrainConfig

DEPTHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200"]


def parse(*argv, path=None) -> PretrainConfig:
    return config_lib.parse(PretrainConfig, (["--config", str(path)] if path else []) + [str(a) for a in argv])[0]


def one_error_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# built-in ResNets: depths and widths
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", DEPTHS)
def test_every_depth_trains_at_tiny_width(arch):
    torch.manual_seed(0)
    m = SimCLRModel(arch, cifar_stem=True, width=4, proj_dim=8)
    blocks = sum(1 for k in m.convnet.state_dict() if k.endswith(".conv1.weight") and k.startswith("layer"))
    depth = int(arch[6:])
    per_block = 2 if depth < 50 else 3  # convolutions per residual block
    assert blocks * per_block + 2 == depth  # the stem conv and the fc (not built) complete the depth
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = m(x)
    assert out["h"].shape == (4, 4 * 8 * (1 if depth < 50 else 4)) and out["z"].shape == (4, 8)
    # one real training step: the NT-Xent loss of two views, LARS as in pretraining
    opt = build_optimizer(m, "lars", 0.5, 1e-6)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    views = torch.cat([x, x.flip(3)])  # (2N, 3, 16, 16): view 1 of every image, then view 2
    loss = nt_xent(m(views)["z"], 0.5, 2)[0]
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.convnet.conv1.weight.grad.abs().sum() > 0  # the gradient reaches the stem
    opt.step()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p.detach(), before[n])}
    stuck = {n for n, p in m.named_parameters() if p.requires_grad and p.grad.abs().sum() > 0} - changed
    assert stuck == set() and "convnet.conv1.weight" in changed and "convnet.layer4.0.conv1.weight" in changed
    assert all(torch.isfinite(p).all() for p in m.parameters())


def _doubled(shape: torch.Size) -> tuple:
    """A torchvision ResNet parameter's shape with every channel count doubled (the RGB input stays 3)."""
    if len(shape) == 4:
        return (2 * shape[0], shape[1] if shape[1] == 3 else 2 * shape[1], *shape[2:])
    return tuple(2 * s for s in shape)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet152"])
def test_width_multiplier_two_doubles_every_channel_of_torchvisions_layout(arch):
    with torch.device("meta"):
        ours = ResNet(arch, width=128).state_dict()
        tv = getattr(torchvision.models, arch)().state_dict()
    tv = {k: v for k, v in tv.items() if not k.startswith("fc.")}
    assert list(ours) == list(tv)  # torchvision's parameter names, in its order
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: _doubled(v.shape) for k, v in tv.items()}
    if arch == "resnet50":
        # torchvision's wide_resnet50_2 doubles only the 3x3 convolution inside each bottleneck: those agree, the
        # rest (stem, 1x1 convolutions, h: 2048-d there, 4096-d here) do not
        with torch.device("meta"):
            wide = torchvision.models.wide_resnet50_2().state_dict()
        for k, v in ours.items():
            if k.endswith("conv2.weight"):
                assert v.shape == wide[k].shape, k
        assert ours["conv1.weight"].shape[0] == 2 * wide["conv1.weight"].shape[0]


def test_width_spellings_agree_and_disagreeing_ones_are_refused(tmp_path):
    want = ("resnet50", 128, 2)
    for argv in (["--arch", "resnet50", "--width_multiplier", "2"], ["--arch", "resnet50x2"], ["--arch", "ResNet50x2"],
                 ["--arch", "resnet50", "--width", "128"], ["--arch", "resnet50x2", "--width", "128"]):
        cfg = parse(*argv)
        assert (cfg.arch, cfg.width, cfg.width_multiplier) == want, argv
    assert (lambda c: (c.width, c.width_multiplier))(parse("--arch", "resnet18", "--width", "8")) == (8, 0)
    assert (lambda c: (c.width, c.width_multiplier))(parse("--arch", "resnet18")) == (64, 1)
    for argv, needle in ((["--arch", "resnet50", "--width", "8", "--width_multiplier", "2"], "64 x k = 128"),
                         (["--arch", "resnet50x2", "--width_multiplier", "4"], "give one of them"),
                         (["--arch", "resnet51"], "did you mean 'resnet50'"),
                         (["--arch", "resnet50x2", "--timm_kwargs", '{"a": 1}'],
                          "applies to timm: archs and the in-repo")):
        with pytest.raises(ConfigError, match=needle):
            parse(*argv)
    # a width on the command line replaces the file's multiplier (a tiny run of a big config); in one place, both
    # must agree
    f = tmp_path / "x2.yaml"
    f.write_text("arch: resnet50\nwidth_multiplier: 2\n")
    cfg = parse("--width", "8", path=f)
    assert (cfg.width, cfg.width_multiplier) == (8, 0)
    assert parse(path=f).width == 128
    # the saved config re-reads to the same config
    config_lib.save(parse(path=f), tmp_path / "saved.yaml")
    assert parse(path=tmp_path / "saved.yaml") == parse(path=f)


def test_disagreeing_widths_through_the_cli_are_one_error_line(tmp_path):
    r = run_cli("pretrain", *tiny_args(tmp_path, arch="resnet50x2", width=8))
    one_error_line(r, "--width 8", "64 x k = 128")
    assert not (tmp_path / "logs").exists()


# the official tables: SimCLR v1 (ResNet-50 1x/2x/4x: 24M/94M/375M) and the v2 README (ResNet-101/152: 43M/58M)
PAPER_CONFIGS = {"imagenet_r50x1_epochs1000_bs4096.yaml": ("resnet50", 64, 24, 2048),
                 "imagenet_r50x2_epochs1000_bs4096.yaml": ("resnet50", 128, 94, 4096),
                 "imagenet_r50x4_epochs1000_bs4096.yaml": ("resnet50", 256, 375, 8192),
                 "imagenet_r101_epochs800_bs4096.yaml": ("resnet101", 64, 43, 2048),
                 "imagenet_r152_epochs800_bs4096.yaml": ("resnet152", 64, 58, 2048)}


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_configs_build_the_published_networks_and_take_a_step(name):
    import numpy as np
    from simclr.data.datasets import ArrayImages
    from simclr.train import build, train_step
    cfg = parse(path=REPO / "configs" / name)
    arch, width, params_m, feat = PAPER_CONFIGS[name]
    assert (cfg.arch, cfg.width, cfg.data, cfg.batch_size, cfg.temperature) == (arch, width, "imagenet", 4096, 0.1)
    with torch.device("meta"):  # the full-size network, without allocating it
        full = build_model(cfg, 224)
    assert round(sum(p.numel() for p in full.convnet.parameters()) / 1e6) == params_m
    assert full.feat_dim == feat and not full.cifar_stem
    # the config's recipe (optimizer, schedule, lr scaling, head) for one step, at a tiny width on 32 px images
    small = config_lib.build(PretrainConfig, dict(config_lib.to_dict(cfg), width=4, width_multiplier=0, data="cifar10",
                                                  batch_size=8, iters=2, workers=0, device="cpu", dist="none",
                                                  loader="reference", seed=0))
    rng = np.random.default_rng(0)
    images = ArrayImages(rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), [0] * 16, ["a"], "rand", 32)
    torch.manual_seed(0)
    parts = build(small, images, torch.device("cpu"))
    assert parts.lrs.max() == pytest.approx(4.8 * 8 / 4096 if cfg.lr_scaling == "linear" else 0.075 * 8 ** 0.5)
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    x, _ = next(iter(parts.loader.batches(0, 1)))
    loss, _, updated = train_step(parts, x, 0)
    assert updated and torch.isfinite(loss)
    assert not torch.equal(before["convnet.layer4.0.conv1.weight"], parts.model.convnet.layer4[0].conv1.weight)


# --------------------------------------------------------------------------------------------
# timm models
# --------------------------------------------------------------------------------------------
VIT = "timm:vit_tiny_patch16_224"


def test_timm_h_is_the_models_pooled_feature_and_the_head_is_sized_from_it():
    torch.manual_seed(0)
    cfg = parse("--arch", VIT, "--image_size", "32", "--timm_kwargs", '{ "patch_size" : 4 }', "--proj_dim", "16")
    assert cfg.timm_kwargs == '{"patch_size":4}'  # one canonical spelling, so resumes compare equal
    m = build_model(cfg, 32).eval()
    assert m.timm_kwargs == {"patch_size": 4, "img_size": 32} and m.feat_dim == 192
    assert m.projection.fc1.in_features == 192 and m.projection.fc2.out_features == 16
    # reference: timm's own classifier model with the same trunk weights; its pre-logits feature is h
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4).eval()
    missing, unexpected = ref.load_state_dict(m.convnet.state_dict(), strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m(x)["h"], ref.forward_head(ref.forward_features(x), pre_logits=True), atol=1e-6)
    # a CNN takes no img_size: built without it, any input size works
    r18 = build_model(parse("--arch", "timm:resnet18"), 32)
    assert r18.timm_kwargs == {} and r18.feat_dim == 512 and r18.name == "timm:resnet18"


def test_timm_options_are_checked(tmp_path):
    for argv, needle in ((["--arch", "timm:resnt18"], "did you mean timm:resnet18"),
                         (["--arch", VIT, "--timm_kwargs", "{patch_size: 4}"], "not valid JSON"),
                         (["--arch", VIT, "--timm_kwargs", "[4]"], "must be a JSON object"),
                         (["--arch", VIT, "--timm_kwargs", '{"img_size": 64}'], "--image_size"),
                         (["--arch", VIT, "--timm_kwargs", '{"num_classes": 5}'], "headless"),
                         (["--arch", "timm:resnet18", "--width", "16"], "built-in ResNets"),
                         (["--arch", "timm:resnet18", "--zero_init_residual", "true"], "zero_init_last")):
        with pytest.raises(ConfigError, match=needle):
            parse(*argv)
    f = tmp_path / "vit.yaml"  # YAML may write the arguments as a mapping
    f.write_text(f"arch: {VIT}\ntimm_kwargs: {{patch_size: 4, global_pool: avg}}\n")
    assert parse(path=f).timm_kwargs == '{"global_pool":"avg","patch_size":4}'
    with pytest.raises(ConfigError, match="patch_sise"):  # an argument the model does not take: at build time
        build_model(parse("--arch", VIT, "--timm_kwargs", '{"patch_sise": 4}'), 32)


def test_lars_leaves_out_1d_parameters_position_embeddings_and_tokens_as_timm_does():
    from timm.optim import param_groups_weight_decay
    m = build_model(parse("--arch", VIT, "--timm_kwargs", '{"patch_size": 8, "depth": 2}'), 32)
    ours = {id(p) for p in param_groups(m, 1e-6)[1]["params"]}
    ref = param_groups_weight_decay(m.convnet, 1e-6, no_weight_decay_list=m.convnet.no_weight_decay())
    ref_ids = {id(p) for g in ref if g["weight_decay"] == 0.0 for p in g["params"]}
    trunk = {id(p) for p in m.convnet.parameters()}
    assert ours & trunk == ref_ids
    names = {id(p): n for n, p in m.named_parameters()}
    assert {"convnet.pos_embed", "convnet.cls_token"} <= {names[i] for i in ours}
    assert "convnet.blocks.0.attn.qkv.weight" not in {names[i] for i in ours}


def test_batch_norm_with_activation_is_synced_with_its_activation():
    from timm.layers import BatchNormAct2d
    def make():  # conversion replaces the children of the module it is given
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=torch.nn.ReLU))
    torch.manual_seed(0)
    net = make()
    x = torch.randn(2, 3, 8, 8)
    want = net(x)
    assert (want == 0).any()  # the activation matters here
    synced = convert_sync_batchnorm(net, torch.device("cpu"))  # outside a process group: plain batch norm + act
    assert type(synced[1]).__name__ == "GlobalBatchNormAct"
    assert torch.equal(synced(x), want)
    # on CUDA timm's own converter keeps the activation (the conversion itself runs anywhere)
    on_gpu = convert_sync_batchnorm(make(), torch.device("cuda"))
    assert type(on_gpu[1]).__name__ == "SyncBatchNormAct" and isinstance(on_gpu[1].act, torch.nn.ReLU)
    assert type(convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4)), torch.device("cuda"))[0]) \
        is torch.nn.SyncBatchNorm

    class OwnForward(torch.nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2
    with pytest.raises(ConfigError, match="sync_bn false"):
        convert_sync_batchnorm(torch.nn.Sequential(OwnForward(4)), torch.device("cpu"))


def _hide_timm(tmp_path: Path) -> dict:
    shim = tmp_path / "shim" / "timm"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named timm (hidden by the test)')\n")
    return {"PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow  # a real process or a long wait: `make test` runs it, `make test-fast` leaves it out
def test_without_timm_a_timm_arch_is_one_error_line_and_nothing_else_needs_it(tmp_path):
    env = _hide_timm(tmp_path)
    r = run_cli("pretrain", *tiny_args(tmp_path, arch="timm:resnet18", width=0), env=env, subprocess=True)
    one_error_line(r, "timm:resnet18", "pip install 'simclr-torch[timm]'")
    # every module of the package imports without timm, and none of them imports it
    code = ("import importlib, pkgutil, sys, simclr\n"
            "for m in pkgutil.walk_packages(simclr.__path__, 'simclr.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "assert 'timm' not in sys.modules, 'timm imported'\n"
            "from simclr.models import build_model\n"
            "from simclr.options import PretrainConfig\n"
            "build_model(PretrainConfig(arch='resnet18', width=8), 32)\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **env), cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_runs_index_names_the_backbone(tmp_path):
    import yaml
    from simclr import runs
    for run_id, cfg in (("a", dict(arch="resnet50", width=128, width_multiplier=2)),
                        ("b", dict(arch="timm:resnet18", width=0, width_multiplier=0)),
                        ("c", dict(arch="resnet18", width=8, width_multiplier=0))):
        p = tmp_path / "logs" / "n" / run_id
        p.mkdir(parents=True)
        (p / "config.yaml").write_text(yaml.safe_dump(dict(cfg, name="n", problem="sim-clr", data="cifar10")))
        (p / "status.json").write_text(json.dumps({"status": "finished", "step": 1}))
    df = runs.index(tmp_path / "logs").set_index("id")
    assert df.loc["a", "arch"] == "resnet50x2" and df.loc["b", "arch"] == "timm:resnet18"
    assert df.loc["c", "arch"] == "resnet18"


# --------------------------------------------------------------------------------------------
# a timm ResNet and a tiny timm ViT through the whole life of a run, on real CIFAR-10
# --------------------------------------------------------------------------------------------
# Calibrated on the 2-core development CPU: each run is stopped half-way and resumed, and its kNN monitor (the same
# comparison as test_pretrain's: the same images at step 0 and at the end) must rise by (top-1, top-5) points.
# ResNet-18 (timm's stem, built for 224 px): 16.4% -> 25.4% top-1 in 24 steps. The ViT (2 blocks of width 96 on
# 8x8 patches, 17 tokens) learns far slower: 60 steps gave +3.2 / +2.4 / +0.6 top-1 and +3.2 / +4.6 / +4.8 top-5
# for seeds 0 / 1 / 2, hence its margins.
LIFE = {
    "timm:resnet18": (dict(iters=24, lr=1.0, temperature=0.2, warmup=0.1, color_dist_s=0.5), 3.0, 2.0),
    VIT: (dict(iters=60, timm_kwargs='{"patch_size": 8, "depth": 2, "embed_dim": 96}', opt="adam", lr=0.001,
               temperature=0.2, warmup=0.05, color_dist_s=0.5, scale_lower=0.2, weight_decay=0, knn_k=20), 0.2, 2.0),
}


def _metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(LIFE))
def test_timm_model_trains_resumes_evaluates_and_exports(tmp_path, data_root, arch):
    import simclr
    from simclr import runs
    over, top1_rise, top5_rise = LIFE[arch]
    env = {"OMP_NUM_THREADS": "2"}
    args = tiny_args(tmp_path, arch=arch, width=0, train_subset=1000, test_subset=500, batch_size=32,
                     eval_at_start="true", stop_after=over["iters"] // 2, log_freq=over["iters"] // 2, **over)
    r = run_cli("pretrain", *args, env=env)
    assert r.returncode == 0 and "status: interrupted" in r.stdout, r.stderr
    (run,) = [p for p in (tmp_path / "logs" / "t").iterdir() if p.is_dir()]
    r = run_cli("pretrain", "--resume", run, env=env)  # the run's own config.yaml, timm name and kwargs included
    assert r.returncode == 0 and f"status: finished at step {over['iters']}" in r.stdout, r.stderr
    knn = [m for m in _metrics(run) if "knn_top1" in m]
    start, end = knn[0], knn[-1]
    assert (start["step"], end["step"]) == (0, over["iters"])
    print(f"{arch}: kNN top-1 / top-5 {start['knn_top1']:.2f} / {start['knn_top5']:.2f}% at random init -> "
          f"{end['knn_top1']:.2f} / {end['knn_top5']:.2f}%")
    assert end["knn_top1"] >= start["knn_top1"] + top1_rise and end["knn_top5"] >= start["knn_top5"] + top5_rise

    # simclr knn on the run folder rebuilds the encoder from the checkpoint and reproduces the monitor's number
    r = run_cli("knn", "--encoder_ckpt", run, "--train_subset", 1000, "--test_subset", 500,
                "--k", over.get("knn_k", 200), "--device", "cpu", "--workers", 0, "--root", tmp_path / "logs",
                "--name", "k", "--verbose", "false",
                "--cache_features", "false", env=env)
    assert r.returncode == 0, r.stderr
    (ev,) = (tmp_path / "logs" / "k").glob("*/eval.json")
    ev = json.loads(ev.read_text())
    assert ev["encoder"]["arch"] == arch and ev["top1"] == pytest.approx(end["knn_top1"], abs=0.21)  # <= 1 tie

    # export: timm's own key names, loadable by timm.create_model with the card's arguments; same features
    out = tmp_path / "enc.pth"
    r = run_cli("export", run, "--out", out, env=env)
    assert r.returncode == 0 and "timm.create_model" in r.stdout, r.stderr
    card = json.loads((tmp_path / "enc.pth.json").read_text())
    assert card["format"] == "timm" and card["arch"] == arch
    name = arch.split(":", 1)[1]
    ref = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), num_classes=0,
                            **card["timm_kwargs"]).eval()
    enc = simclr.load_encoder(run)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = enc(x)
        assert torch.equal(ref(x), want)
        assert torch.equal(simclr.load_encoder(out)(x), want)  # the export, read back by this project
    st = tmp_path / "enc.safetensors"
    assert run_cli("export", run, "--out", st, "--format", "safetensors", env=env).returncode == 0
    ref = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(st)), num_classes=0,
                            **card["timm_kwargs"]).eval()
    with torch.no_grad():
        assert torch.equal(ref(x), want) and torch.equal(simclr.load_encoder(st)(x), want)
    # embed: a folder of real images -> the same rows as the encoder on those images
    import numpy as np
    from simclr.cli import embed_main
    from simclr.export import load_image
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((data_root / "cifar10" / "test" / "cat").iterdir())[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    assert embed_main(["--encoder_ckpt", str(out), "--images", str(folder), "--out", str(tmp_path / "f.npy"),
                       "--device", "cpu"]) == 0
    imgs = torch.stack([load_image(p, 32) for p in sorted(folder.iterdir())])
    with torch.no_grad():
        assert np.allclose(np.load(tmp_path / "f.npy"), enc(imgs).numpy(), atol=1e-6)
    # the run index names the backbone on the pretraining and the evaluation rows
    df = runs.index(tmp_path / "logs")
    assert set(df["arch"]) == {arch}
