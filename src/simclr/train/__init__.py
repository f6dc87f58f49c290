"""SimCLR pretraining, one module per seam: :mod:`.pretraining` (the entry and the set-up), :mod:`.loop` (the
steps, with log, kNN and save points), :mod:`.step` (one step and the parts it runs on), :mod:`.resume` (where a
run continues from, and saving), :mod:`.session` (a run's state); :mod:`.probe` is the optional online linear
probe."""
from .pretraining import pretrain, random_init_knn, setup
from .resume import save
from .session import Session
from .step import DivergenceGuard, Parts, build, train_step, wrap

__all__ = ["DivergenceGuard", "Parts", "Session", "build", "pretrain", "random_init_knn", "save", "setup", "train_step",
           "wrap"]
