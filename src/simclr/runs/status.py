"""Is a run that says ``running`` still alive? The decision the index makes for every run folder.

On the run's own host the process decides: gone, a zombie, or a pid now owned by a process created
after the run started (pid reuse) all mean the run died without a word. On any host a heartbeat
(``updated`` in status.json, refreshed every :data:`simclr.rundir.HEARTBEAT_S`) older than
:data:`STALE_S` means the same. Process facts come from ``psutil``, so this works wherever psutil
does (Linux, macOS, Windows), not only where ``/proc`` exists.
"""
from __future__ import annotations

import socket
import time
from typing import Optional

import psutil

from ..rundir import HEARTBEAT_S

STATUSES = ("running", "finished", "failed", "interrupted", "unknown")
# A running run whose status.json is older than this is considered dead (10 missed heartbeats).
STALE_S = 10 * HEARTBEAT_S
# status.json's "started" is written a moment after the process starts; a process created more than
# this after it cannot be the run's own
PID_REUSE_SLACK_S = 5.0


def process_state(pid: int) -> tuple[Optional[str], Optional[float]]:
    """('alive' | 'dead' | None, creation time or None) of a process on this host.

    A zombie (exited, not yet reaped) counts as dead; someone else's process we may not inspect counts
    as alive with an unknown creation time; None: it cannot be told.
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return "dead", None
        return "alive", proc.create_time()
    except psutil.NoSuchProcess:  # also ZombieProcess on platforms that raise it
        return "dead", None
    except psutil.AccessDenied:
        return "alive", None
    except (psutil.Error, ValueError, OverflowError, OSError):
        return None, None


def effective_status(st: dict, now: Optional[float] = None, host: Optional[str] = None) -> tuple:
    """(status, reason) of a status.json dict, turning a dead 'running' run into 'interrupted'."""
    status = st.get("status") if isinstance(st.get("status"), str) else "unknown"
    if status not in STATUSES:
        status = "unknown"
    if status != "running":
        return status, str(st.get("error") or "")
    now = time.time() if now is None else now
    host = socket.gethostname() if host is None else host
    pid = st.get("pid")
    if st.get("host") == host and isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
        state, created = process_state(pid)
        if state == "dead":
            return "interrupted", f"process {pid} on {host} is gone (killed without warning?)"
        started = st.get("started")
        if created is not None and isinstance(started, (int, float)) and created > started + PID_REUSE_SLACK_S:
            return "interrupted", f"process {pid} on {host} is gone (the pid now belongs to another process)"
    updated = st.get("updated")
    if isinstance(updated, (int, float)) and now - updated > STALE_S:
        return "interrupted", f"no heartbeat for {(now - updated) / 60:.0f} min (killed without warning?)"
    return "running", ""
