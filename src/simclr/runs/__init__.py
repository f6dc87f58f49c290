"""Run folders, read: ``simclr.runs.index(root)`` -> a pandas DataFrame, one row per run.

    folder.py   read the files of one run folder (config, metrics, eval results), tolerantly
    status.py   whether a run that says 'running' is alive (psutil + heartbeat)
    evals.py    what an eval run measured, and which pretraining run's checkpoint it evaluated
    index.py    one row per run folder under a root -> pandas DataFrame; filters
    cli.py      ``simclr runs``: the index as a table, CSV or JSON

The writer of run folders is :mod:`simclr.rundir` (used by training and evaluation); nothing here
writes. Note: ``simclr.runs.index`` is the *function* (the public API); the module is
``simclr.runs.index`` in ``sys.modules`` and reached with ``from simclr.runs.index import ...``.
"""
from __future__ import annotations

from .folder import flatten, read_config, read_evals, read_json, read_metrics
from .index import MARKERS, SUMMARY_COLUMNS, Index, filter_rows, find_runs, index, summarize, with_links
from .status import STALE_S, STATUSES, effective_status

__all__ = ["MARKERS", "SUMMARY_COLUMNS", "STALE_S", "STATUSES", "Index", "effective_status", "filter_rows",
           "find_runs", "flatten", "index", "read_config", "read_evals", "read_json", "read_metrics", "summarize",
           "with_links"]
