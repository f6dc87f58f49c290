"""Look at runs: a static HTML report per run folder, and several runs compared on one figure.

    plots.py      matplotlib figures from the logged records (curves, lr, accuracy, speed, eval, compare)
    pictures.py   pictures that need the images and the encoder (views, retrieval, embedding)
    page.py       report.html from templates/report.html.j2 (Jinja2, autoescaped)
    cli.py        ``simclr report`` and ``simclr compare``
"""
from __future__ import annotations

from .page import write_report
from .plots import compare, config_diff

__all__ = ["compare", "config_diff", "write_report"]
