"""SimCLR pretraining: :mod:`.pretraining` reads top to bottom (entry, setup, loop, one step); :mod:`.probe` is the
optional online linear probe."""
from .pretraining import (DivergenceGuard, Parts, Session, build, pretrain, random_init_knn, save, setup, train_step,
                          wrap)

__all__ = ["DivergenceGuard", "Parts", "Session", "build", "pretrain", "random_init_knn", "save", "setup", "train_step",
           "wrap"]
