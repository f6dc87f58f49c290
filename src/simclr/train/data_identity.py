"""What a resume checks of its images, and what a refused resume leaves behind.

A pretraining checkpoint records the content identity of its split (``data_content``: paths below the split's
root, sizes, bytes; see :mod:`simclr.data.identity`) and its listing (``data_listing``: paths below the root and
sizes). Staging the data anew before each requeued job (another path, new modification times, one copy per node)
changes neither, so such a resume goes on; images rewritten, added or removed are refused.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from ..files import read_small_json
from ..rundir import MAX_RUN_JSON, RunDir, is_run

log = logging.getLogger(__name__)


def check_data_identity(ck: dict, images, path: Path, allow: bool) -> None:
    """Refuse to continue on other images than the checkpoint's: that is another trajectory.
    ``--allow_config_change`` continues with a warning.

    Checkpoints written before content identities hold a ``data_fingerprint`` of absolute paths and modification
    times, which any staged copy changes; of those, the listing (names and sizes) is compared, and a match
    continues with a note (a rewritten image of the same size cannot be told from them)."""
    content, listing = ck.get("data_content") or "", ck.get("data_listing") or ""
    other_files = "files added, removed, renamed, or rewritten with another size"
    if content and images.fingerprint:
        if content == images.fingerprint:
            return
        how = ("the same file names and sizes, other bytes: images rewritten in place" if listing == images.listing
               else other_files)
        what = f"data fingerprint {content} -> {images.fingerprint}: {how}"
    elif listing and images.listing:
        if listing == images.listing:
            if ck.get("data_fingerprint"):
                log.info(f"note: {path} predates content fingerprints: its images were compared by names and sizes "
                         f"only")
            return
        what = f"data listing {listing} -> {images.listing}: {other_files}"
    else:
        return
    what = f"the training images changed since {path} was saved ({what})"
    if not allow:
        raise UserError(f"{what}; restore them, or pass --allow_config_change true to continue on these")
    log.warning(f"warning: {what}; continuing on them (--allow_config_change)")


def record_refusal(run_dir: str, error: Exception) -> None:
    """A resume of the ``interrupted`` run ``run_dir`` refused before training (other images, other options, data
    not found): its status.json says ``failed`` with the error, so a requeue loop that requeues while the run is
    ``interrupted`` (docs/long-runs.md) stops instead of starting the refused job again and again. Any other
    status (a finished run resumed with a typo) is left as it is, and so is a folder another process holds (its
    lock): its status is that process's."""
    if not run_dir or not _interrupted(Path(run_dir)):
        return
    try:
        run = RunDir(Path(run_dir), tensorboard=False)
    except (UserError, OSError):
        return
    try:
        old = read_small_json(Path(run_dir) / "status.json", MAX_RUN_JSON)  # again, under the lock
        if _interrupted(Path(run_dir)):
            kept = {k: v for k, v in old.items() if k not in _SET_ANEW}
            run.set_status("failed", **kept, error=f"{type(error).__name__}: {error}")
    except (UserError, OSError):
        pass
    finally:
        run.close()


def _interrupted(run: Path) -> bool:
    old = read_small_json(run / "status.json", MAX_RUN_JSON) if is_run(run) else None
    return isinstance(old, dict) and old.get("status") == "interrupted"


_SET_ANEW = ("status", "kind", "pid", "host", "updated", "started", "train_s", "error")  # by RunDir.set_status


@contextmanager
def refusal_recorded(run_dir: str, main: bool):
    """Around a resume's set-up: an error (not a signal: a pre-empted set-up stays ``interrupted`` and is
    requeued) is recorded by :func:`record_refusal` on the main process, then raised as it was."""
    try:
        yield
    except Exception as e:
        if main:
            record_refusal(run_dir, e)
            if isinstance(e, UserError) and run_dir and is_run(Path(run_dir)):
                e.run_dir = run_dir  # the entry point says how to continue once the cause is fixed
        raise
