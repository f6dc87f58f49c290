"""Run folders, read: ``simclr.runs.index(root)`` -> a pandas DataFrame, one row per run.

    index.py    read run folders (config, status, metrics, eval results) into the index
    status.py   whether a run that says 'running' is alive (psutil + heartbeat)
    cli.py      ``simclr runs``: the index as a table, CSV or JSON

The writer of run folders is :mod:`simclr.rundir` (used by training and evaluation); nothing here
writes. Note: ``simclr.runs.index`` is the *function* (the public API); the module is
``simclr.runs.index`` in ``sys.modules`` and reached with ``from simclr.runs.index import ...``.
"""
from __future__ import annotations

from .index import (MARKERS, SUMMARY_COLUMNS, Index, filter_rows, find_runs, flatten, index, read_config,
                    read_evals, read_json, read_metrics, summarize)
from .status import STALE_S, STATUSES, effective_status

__all__ = ["MARKERS", "SUMMARY_COLUMNS", "STALE_S", "STATUSES", "Index", "effective_status", "filter_rows",
           "find_runs", "flatten", "index", "read_config", "read_evals", "read_json", "read_metrics", "summarize"]
