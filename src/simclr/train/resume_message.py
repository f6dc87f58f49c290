"""Why a resume that would change the run is refused, in words that lead to the fix."""
from __future__ import annotations

from pathlib import Path

from .. import config as config_lib
from ..errors import UserError


def changes_message(path: Path, changes: dict) -> str:
    """Why a resume that changes the run is refused: the run's config.yaml edited since it was saved (it holds
    the new values; the fix is to put the old ones back), or options given now (the fix is to leave them out)."""
    run_config = path.parent.parent / "config.yaml"
    try:
        written = config_lib.load_yaml(str(run_config)) if path.parent.name == "checkpoints" else {}
    except (OSError, UserError):
        written = {}
    edited = {k: v for k, v in changes.items() if isinstance(written, dict) and k in written and written[k] == v[1]}
    given = {k: v for k, v in changes.items() if k not in edited}
    parts = []
    if edited:
        listed = "; ".join(f"{k}: {new!r} there, {old!r} in the checkpoint" for k, (old, new) in edited.items())
        parts.append(f"{run_config} differs from the config saved in {path.name} ({listed}): put back "
                     f"{', '.join(f'{k}: {old!r}' for k, (old, new) in edited.items())} in it to continue the run "
                     f"as it was")
    if given:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in given.items())
        parts.append(f"options that change the run ({listed}): leave them out to continue the run as it was")
    return (f"resuming {path}: {'; '.join(parts)}; or pass --allow_config_change true to continue with the new "
            f"values")
