"""The options of ``simclr export`` and ``simclr embed`` (the work itself is :mod:`simclr.export`'s, the command
lines :func:`simclr.cli.export_main` / :func:`simclr.cli.embed_main`). Apart from the export module so that their
``--help`` and option errors answer without importing torch."""
from __future__ import annotations

from dataclasses import MISSING, dataclass
from pathlib import Path

from .config import nonneg, option, positive, shown
from .errors import ConfigError
from .options import ENCODE_LAYER_HELP

EXPORT_FORMATS = ("auto", "torchvision", "timm", "safetensors")


@dataclass
class ExportConfig:
    """Export an encoder for downstream code: torchvision-named .pth or safetensors, model card <out>.json beside."""

    COMMAND = "export"
    YAML = False

    ckpt: str = option(MISSING, "our checkpoint (or a run folder: its newest valid one; or its .json card), the "
                       "spec's .pth.tar, or an earlier export", positional=True)
    out: str = option(None, "output file, e.g. resnet50_simclr.pth or encoder.safetensors (required)")
    format: str = option("auto", "output format: torchvision (torch.save state dict, torchvision's names; ResNets), "
                         "timm (torch.save state dict, timm's names; timm: encoders, loadable by timm.create_model), "
                         "auto (the one of these two that fits), safetensors (either, as safetensors)",
                         EXPORT_FORMATS)
    include_head: bool = option(False, "also write the projection head as projection.* keys (then torchvision "
                                       "needs strict=False)")
    trust_checkpoint: bool = option(False, "allow full unpickling of a checkpoint that needs it (only for files "
                                           "you trust)")
    force: bool = option(False, "overwrite --out (and its card) even when no export wrote it")

    def check(self) -> None:
        if not self.out:
            raise ConfigError("option 'out' is required: the file to write, e.g. --out encoder.pth")


@dataclass
class EmbedConfig:
    """Features of every image under a folder: <out>.npy (one row per image), <out>.files.txt (names in row order)."""

    COMMAND = "embed"
    YAML = False

    encoder_ckpt: str = option(None, "our checkpoint (or a run folder: its newest valid one; or its .json card), "
                               "the spec's .pth.tar, or an export (required)")
    images: str = option(None, "folder of images, searched recursively (required)")
    out: str = option(None, "output .npy file (required); the file names go to <out stem>.files.txt")
    layer: str = option("h", ENCODE_LAYER_HELP)
    batch_size: int = option(256, "images encoded per forward pass (memory, not results)", check=positive,
                             check_msg="must be > 0")
    workers: int = option(0, "DataLoader worker processes for decoding", check=nonneg, check_msg="must be >= 0")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    skip_bad_images: bool = option(False, "skip unreadable images (left out of both files) instead of failing")
    trust_checkpoint: bool = option(False, "allow full unpickling of a checkpoint that needs it (only for files "
                                           "you trust)")
    force: bool = option(False, "overwrite --out and its .files.txt even when no embed wrote them")

    def check(self) -> None:
        for key in ("encoder_ckpt", "images", "out"):
            if not getattr(self, key):
                raise ConfigError(f"option '{key}' is required (see `simclr embed --help`)")
        if self.layer not in ("h", "z") and not (self.layer[:1] == "g" and self.layer[1:].isdigit()):
            raise ConfigError(f"option 'layer' got {shown(self.layer)}; allowed: h, z, g1, g2, g3")
        if Path(self.out).suffix != ".npy":
            raise ConfigError(f"--out {self.out} must end in .npy")
