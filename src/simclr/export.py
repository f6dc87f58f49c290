"""``simclr export`` and ``simclr embed``: encoder weights and features for downstream code.

export: any checkpoint ``load_encoder`` accepts -> the encoder trunk as a state dict under its own library's key
names: torchvision's for the ResNets (``conv1.weight``, ``layer1.0.bn1.running_mean`` ... no ``fc``), timm's for a
``timm:`` encoder; as a ``torch.save`` file (``--format torchvision`` / ``timm``, ``auto`` picks the one that fits)
or safetensors (``--format safetensors``), plus a model card ``<out>.json`` (SHA-256, architecture, data, input
size, metrics, the lines that load it) beside it.

embed: an image folder -> ``features.npy`` (one float32 row per image) and ``features.files.txt``
(the image paths relative to the folder, one per line, in row order).

The command lines (``simclr export`` / ``simclr embed``) are :func:`simclr.cli.export_main` and
:func:`simclr.cli.embed_main`; their options are in :mod:`simclr.export_options`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .checkpoint import resolve, write_with_card
from .data.datasets import IMG_EXTENSIONS
from .data.images import open_rgb
from .errors import ConfigError, DataError, UserError
from .files import claim_output, read_small_json, sha256_file
from .models import is_named, is_timm
from .models.timm_trunk import create_call
from .names import DATA_ALIASES
from .export_options import EXPORT_FORMATS as FORMATS
from .weights import Encoder, load_encoder


def card_path(out: Path) -> Path:
    """``encoder.safetensors`` -> ``encoder.safetensors.json`` (a .pth and a .safetensors export of the same
    stem keep separate cards)."""
    return out.with_name(out.name + ".json")


def torchvision_state(enc: Encoder, include_head: bool = False) -> dict:
    """The trunk's state dict under torchvision's names (fresh contiguous tensors, no shared storage)."""
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in enc.model.convnet.state_dict().items()}
    if include_head:
        sd.update({f"projection.{k}": v.detach().cpu().contiguous().clone()
                   for k, v in enc.model.projection.state_dict().items()})
    return sd


def torchvision_recipe(enc: Encoder) -> list:
    """The lines that load an export into ``torchvision.models.<arch>()``."""
    lines = [f"m = torchvision.models.{enc.arch}()"]
    if enc.cifar_stem:
        lines += ["m.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)",
                  "m.maxpool = torch.nn.Identity()"]
    lines += ["m.fc = torch.nn.Identity()", "m.load_state_dict(torch.load(PATH, weights_only=True))"]
    return lines


def timm_recipe(enc: Encoder) -> list:
    """The lines that load a timm export with timm itself (timm reads .pth and .safetensors files alike)."""
    return ["import timm", create_call(enc.arch, enc.timm_kwargs)]


def _format(fmt: str, enc: Encoder) -> str:
    """``auto``: torchvision for the ResNets, timm for a timm: encoder; a format that does not fit is refused."""
    timm_enc = is_timm(enc.arch)
    if is_named(enc.arch) and not timm_enc:  # an in-repo backbone (simclr.names.BACKBONES): no other library has it
        if fmt in ("torchvision", "timm"):
            raise ConfigError(f"--format {fmt}: {enc.arch} is one of this project's in-repo backbones; use --format "
                              f"safetensors (or auto) and load it with simclr.load_encoder")
        return "safetensors"
    if fmt == "auto":
        return "timm" if timm_enc else "torchvision"
    if fmt == "torchvision" and timm_enc:
        raise ConfigError(f"--format torchvision: {enc.arch} is not a torchvision model; use --format timm (or auto, "
                          f"or safetensors)")
    if fmt == "timm" and not timm_enc:
        raise ConfigError(f"--format timm: {enc.name} is one of this project's ResNets (torchvision's layout); use "
                          f"--format torchvision (or auto, or safetensors)")
    return fmt


def _dataset_name(data):
    """The spec writes 'cifar' for CIFAR-10; cards use our canonical names."""
    return DATA_ALIASES.get(str(data).lower(), data) if data else data


def _cards_of(path: Path) -> list:
    """Where a model card of ``path`` may lie (``X.pth.json`` for exports, ``X.json`` for checkpoints)."""
    return [card_path(path), path.with_suffix(".json")]


def _refuse_overwriting_input(ckpt: Path, out: Path) -> None:
    """``--out`` must not be the input, nor one of its cards, nor a name whose card would land on one."""
    mine = {p.resolve() for p in [ckpt, *_cards_of(ckpt)]}
    if out.resolve() == ckpt.resolve():
        raise UserError(f"--out {out} is the input checkpoint itself; choose another file name")
    if out.resolve() in mine:
        suggestion = ckpt.with_name(ckpt.stem + "_export.pth")
        raise UserError(f"--out {out} is the model card of the input checkpoint {ckpt}; writing the export there "
                        f"would destroy the card. Choose another file name, e.g. {suggestion}")
    if card_path(out).resolve() in mine:
        raise UserError(f"--out {out} would put its model card at {card_path(out)}, over the input checkpoint's "
                        f"own; choose another file name")


def _export_card(path: Path):
    """The model card an export wrote at ``path`` (a checkpoint's card has no ``source``/``head_included``), or
    None."""
    card = read_small_json(path, 1 << 20)
    return card if isinstance(card, dict) and {"source", "head_included", "sha256"} <= card.keys() else None


def _is_export(path: Path) -> bool:
    """Whether ``path`` is an earlier export: the export card beside it vouches for these bytes."""
    card = _export_card(card_path(path))
    return card is not None and card["sha256"] == sha256_file(path)


def export_encoder(ckpt, out, fmt: str = "torchvision", trust: bool = False, include_head: bool = False,
                   force: bool = False) -> dict:
    """Write the encoder of ``ckpt`` to ``out`` (atomically) and its model card; returns the card. An ``out`` (or
    card) already there that no export wrote (another run's checkpoint, a user's file) is refused unless
    ``force``."""
    if fmt not in FORMATS:
        raise ConfigError(f"option 'format' got {fmt!r}; allowed: {', '.join(FORMATS)}")
    ckpt, out = resolve(ckpt), Path(out)
    _refuse_overwriting_input(ckpt, out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'encoder.pth'}")
    claim_output(out, _is_export, "export", force)
    claim_output(card_path(out), lambda p: _export_card(p) is not None, "export", force)
    enc = load_encoder(ckpt, trust=trust)
    fmt = _format(fmt, enc)
    sd = torchvision_state(enc, include_head)
    timm_enc = is_timm(enc.arch)
    meta = {"arch": enc.arch, "width": enc.width, "cifar_stem": enc.cifar_stem, "feat_dim": enc.feat_dim,
            "input_size": enc.input_size}
    if is_named(enc.arch):
        meta["timm_kwargs"] = enc.timm_kwargs
    if fmt == "safetensors":
        from safetensors.torch import save
        text = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in meta.items()}
        data = save(sd, metadata={**text, "format": "simclr-export"})
    else:
        data = lambda f: torch.save(sd, f)  # noqa: E731
    src = enc.card
    import torchvision
    tv_loadable = enc.width == 64 and not timm_enc and hasattr(torchvision.models, enc.arch)  # no resnet200 there
    recipe = torchvision_recipe(enc) if tv_loadable and not include_head else None
    if fmt == "safetensors" and recipe is not None:
        recipe = [ln.replace("torch.load(PATH, weights_only=True)", "safetensors.torch.load_file(PATH)")
                  for ln in recipe]
    extra = {"timm_recipe": timm_recipe(enc) if not include_head else None} if timm_enc else {}
    card = {"format": fmt, **meta, **extra, "head_included": include_head,
            "input": "float RGB (N, 3, H, W) with values in [0, 1]; no mean/std normalisation",
            "data": _dataset_name(src.get("data") or enc.info.get("data")),
            "step": src.get("step"), "epochs": src.get("epochs"), "metrics": src.get("metrics") or {},
            "source": {"file": ckpt.name, "sha256": sha256_file(ckpt), "format": src.get("format", "simclr")},
            "torchvision_loadable": tv_loadable, "torchvision_recipe": recipe, "simclr_version": __version__}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return write_with_card(out, data, card, card_path(out))
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------
# embed
# ---------------------------------------------------------------------------------------------

def list_images(root: Path) -> list:
    """Every image file under ``root`` (recursively), sorted by relative path."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(f"{root} holds no images (looked recursively for {', '.join(IMG_EXTENSIONS)})")
    bad = [p for p in files if "\n" in p.name or "\r" in p.name]
    if bad:
        raise DataError(f"image file name with a line break cannot be listed one per line: {bad[0]!r}")
    return files


def load_image(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) float in [0, 1]. An image already size x size is used as is; others get their
    shorter side resized to ``size`` (bicubic, antialiased) and a centre crop (keeps the aspect ratio)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    try:
        im = open_rgb(path)
    except Exception as e:  # PIL raises many types for broken files
        raise DataError(f"cannot read image {path}: {e}") from None
    x = TF.pil_to_tensor(im)
    if tuple(x.shape[1:]) != (size, size):
        x = TF.resize(x, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        x = TF.center_crop(x, [size, size])
    return x.float().div_(255).clamp_(0, 1)


class _Files(torch.utils.data.Dataset):
    def __init__(self, files: list, size: int, skip_bad: bool):
        self.files, self.size, self.skip_bad = files, size, skip_bad

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        try:
            return load_image(self.files[i], self.size), i
        except DataError:
            if not self.skip_bad:
                raise
            return torch.zeros(3, self.size, self.size), -1 - i


def _collate(items):
    return torch.stack([x for x, _ in items]), [i for _, i in items]


@torch.inference_mode()
def embed_images(enc: Encoder, root, batch_size: int = 256, workers: int = 0, layer: str = "h",
                 skip_bad: bool = False, device="cpu", progress: bool = False) -> tuple[np.ndarray, list, list]:
    """(features (N, d) float32, relative file names (N,), skipped file names)."""
    from .progress import Progress
    root = Path(root)
    files = list_images(root)
    loader = torch.utils.data.DataLoader(_Files(files, enc.input_size, skip_bad), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_collate)
    device = torch.device(device)
    rows, kept, skipped = [], [], []
    bar = Progress(len(loader), "embed", progress)
    for x, idx in loader:
        bar.update()
        ok = [j for j, i in enumerate(idx) if i >= 0]
        skipped += [files[-1 - i].relative_to(root).as_posix() for i in idx if i < 0]
        if not ok:
            continue
        f = enc.encode(x[ok].to(device), layer) if layer != "h" else enc(x[ok].to(device))
        rows.append(f.float().cpu().numpy())
        kept += [files[idx[j]].relative_to(root).as_posix() for j in ok]
    bar.close()
    if not rows:
        raise DataError(f"no readable image in {root}")
    return np.concatenate(rows).astype(np.float32, copy=False), kept, skipped


def files_list_path(out: Path) -> Path:
    """``features.npy`` -> ``features.files.txt``."""
    return out.with_suffix(".files.txt")


def _is_embedding(npy: Path, names: Path) -> bool:
    """Whether ``npy`` and ``names`` are an earlier embed's pair: a 2-D array with one row per listed file."""
    if any(p.is_symlink() or not p.is_file() for p in (npy, names)):
        return False
    try:
        shape = getattr(np.load(npy, mmap_mode="r", allow_pickle=False), "shape", ())  # an .npz has none
        with open(names, "rb") as f:
            lines = sum(1 for _ in f)
    except (OSError, ValueError):
        return False
    return len(shape) == 2 and shape[0] == lines


def claim_embedding(out: Path, force: bool = False) -> None:
    """Refuse (one line naming --force) to write ``out`` or its file list over files no embed wrote."""
    names = files_list_path(out)
    for path in (out, names):
        claim_output(path, lambda _: _is_embedding(out, names), "embed", force)
