"""SimCLR pretraining. ``step``: the parts of a run and one optimizer step; ``session``: setting a run up,
resuming and saving; ``loop``: the loop itself."""
from .loop import pretrain, random_init_knn
from .session import Session, save, setup
from .step import DivergenceGuard, Parts, build, train_step, wrap

__all__ = ["DivergenceGuard", "Parts", "Session", "build", "pretrain", "random_init_knn", "save", "setup", "train_step",
           "wrap"]
