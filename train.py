#!/usr/bin/env python
"""The spec's entry point, kept working: ``python train.py --config X.yaml [--key value ...]``.

It picks the job from the config's ``problem`` (``sim-clr`` -> ``simclr pretrain``,
``eval`` and ``semi-supervised-eval`` -> ``simclr eval``); every option is the same as for those commands.
"""
import sys
from pathlib import Path

try:
    import simclr  # noqa: F401
except ImportError:  # running from a clone that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from simclr.cli import spec_main

if __name__ == "__main__":
    sys.exit(spec_main(sys.argv[1:]))
