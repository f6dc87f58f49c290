"""SimCLR in PyTorch: pretraining, evaluation and tools for contrastive visual representations."""
from .loss import nt_xent, nt_xent_loss
from .optim import LARS
from . import runs  # simclr.runs.index(root) -> DataFrame; light: pandas loads on first use

__version__ = "0.1.0"
__all__ = ["nt_xent", "nt_xent_loss", "LARS", "__version__"]
