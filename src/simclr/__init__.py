"""SimCLR in PyTorch: pretraining, evaluation and tools for contrastive visual representations."""
from . import runs  # simclr.runs.index(root) -> DataFrame; light: pandas loads on first use
from .loss import nt_xent, nt_xent_loss
from .optim import LARS

__version__ = "0.1.0"
__all__ = ["nt_xent", "nt_xent_loss", "LARS", "load_encoder", "Encoder", "runs", "__version__"]


def __getattr__(name):  # simclr.load_encoder / simclr.Encoder, imported on first use (keeps `import simclr` light)
    if name in ("load_encoder", "Encoder"):
        from . import weights
        return getattr(weights, name)
    raise AttributeError(f"module 'simclr' has no attribute {name!r}")
