"""SimCLR in PyTorch: pretraining, evaluation and tools for contrastive visual representations.

``import simclr`` imports nothing heavy (no torch): the public names below are imported on first use, so
``simclr --help`` and a config error answer at once.
"""
import importlib

from . import messages as _messages

_messages.install()  # the project's messages on the terminal (simclr.messages: how to silence or redirect them)

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {"nt_xent": ".loss", "nt_xent_loss": ".loss", "LARS": ".optim", "load_encoder": ".weights",
         "Encoder": ".weights"}
__all__ = [*_LAZY, "runs", "__version__"]


def __getattr__(name):  # simclr.LARS, simclr.load_encoder, simclr.runs.index ... imported on first use
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    if name == "runs":
        return importlib.import_module(".runs", __name__)
    raise AttributeError(f"module 'simclr' has no attribute {name!r}")
