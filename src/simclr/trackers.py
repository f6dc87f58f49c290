"""Experiment trackers fed by the run-folder writer: TensorBoard, Weights & Biases (offline), MLflow (local).

The run folder's own files (config.yaml, metrics.jsonl, eval.json) are the record; a tracker gets a copy for
the tools people already use (``--logger tensorboard,wandb,mlflow``): the resolved config, every metrics line
at its step, and the final results. Only the main process writes them (it alone holds the
:class:`simclr.rundir.RunDir` they hang on).

    <run>/tb/             TensorBoard event files
    <run>/wandb/          W&B offline runs (``wandb sync <run>/wandb/offline-run-*`` uploads them)
    <run>/mlruns/         the MLflow file store (default; ``--mlflow_uri`` names another tracking URI)
    <run>/trackers.json   the W&B and MLflow run ids: a resumed run continues the same tracker runs

wandb and mlflow are optional packages, imported only when named; a named one that is missing stops the job
before it starts (:func:`require`). Once a job runs, a tracker can only warn: the first of its calls that fails
disables it with one warning, and the job goes on.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import re
import secrets
import time
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

from .errors import UserError
from .files import atomic_write, read_small_json
from .options import parse_loggers

log = logging.getLogger(__name__)

# logger -> (module to import, the pip install that brings it)
PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"),
            "wandb": ("wandb", '"simclr-torch[wandb]"'),
            "mlflow": ("mlflow.tracking", '"simclr-torch[mlflow]"')}
IDS_FILE = "trackers.json"
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def is_file_store(uri: str) -> bool:
    """An MLflow tracking URI that is a local folder (the default ``""`` is ``<run>/mlruns``)."""
    return not uri or urlparse(uri).scheme in ("", "file")


def environment(logger: str, mlflow_uri: str) -> dict:
    """Environment variables the entry point sets (library code never does) for these trackers to run: MLflow 3
    refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE`` is true."""
    if "mlflow" in parse_loggers(logger) and is_file_store(mlflow_uri):
        return {"MLFLOW_ALLOW_FILE_STORE": "true"}
    return {}


def require(logger: str, mlflow_uri: str = "") -> None:
    """Import every tracker ``logger`` names; a missing one is one :class:`UserError` naming the install."""
    for name in parse_loggers(logger):
        module, install = PACKAGES[name]
        try:
            importlib.import_module(module)
        except Exception as e:  # ImportError, or a broken install failing in its own way
            raise UserError(f"--logger {name} needs the {name} package, which cannot be imported ({e}): "
                            f"pip install {install}, or leave {name} out of --logger") from None
    if "mlflow" in parse_loggers(logger) and is_file_store(mlflow_uri):
        env = getattr(importlib.import_module("mlflow.environment_variables"), "MLFLOW_ALLOW_FILE_STORE", None)
        if env is not None and not env.get():
            raise UserError("MLflow refuses a file store (the default --mlflow_uri) unless MLFLOW_ALLOW_FILE_STORE="
                            "true is set (the simclr command sets it): set it, or pass --mlflow_uri")


def scalars(record: dict, prefix: str = "") -> dict:
    """Numbers of ``record`` (nested dicts flattened with dots); booleans, strings, lists and None left out."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------------------------
# one adapter per tracker: log(record, step), results(numbers, full, step, name), finish(status)
# --------------------------------------------------------------------------------------------
class TensorBoard:
    def __init__(self, run: Path, **_):
        self.path, self.writer = run / "tb", None
        self.where = f"TensorBoard {self.path}"

    def log(self, record: dict, step: int) -> None:
        if self.writer is None:  # created at the first line: a run that logs nothing leaves no tb/
            from torch.utils.tensorboard import SummaryWriter
            # flush every 30 s (default 120) so a live run shows up promptly in TensorBoard
            self.writer = SummaryWriter(str(self.path), flush_secs=30)
        for k, v in scalars(record).items():
            if k != "step":
                self.writer.add_scalar(k, v, step)

    def results(self, numbers: dict, full: dict, step: int, name: str) -> None:
        pass  # the results are in the metrics lines it was fed already

    def finish(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


class WandB:
    """An offline W&B run in ``<run>/wandb`` (never the network: ``wandb sync`` uploads it later)."""

    def __init__(self, run: Path, config: dict, project: str, ids: dict, **_):
        import wandb
        ids.setdefault("wandb_id", secrets.token_hex(4))  # kept in trackers.json: a resume continues this W&B run
        settings = dict(console="off", silent=True, disable_git=True, save_code=False)  # our log says where it is
        fields = getattr(wandb.Settings, "model_fields", {})  # newer wandb: no system sampling, no pip freeze
        settings.update({k: v for k, v in (("x_disable_stats", True), ("x_disable_machine_info", True),
                                           ("x_save_requirements", False)) if k in fields})
        # W&B project names may not hold / \ # ? % : (and stay under 128 characters)
        self.run = wandb.init(project=re.sub(r"[/\\#?%:]", "-", project)[:128] or "simclr", name=run.name,
                              id=ids["wandb_id"], resume="allow", dir=str(run), mode="offline", config=config,
                              settings=wandb.Settings(**settings))
        offline = Path(self.run.dir).parent
        self.where = f"W&B offline run {offline} (upload: wandb sync {offline})"

    def log(self, record: dict, step: int) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def results(self, numbers: dict, full: dict, step: int, name: str) -> None:
        self.run.summary.update(numbers)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


class MLflow:
    """One MLflow run (``--mlflow_uri``, default the file store ``<run>/mlruns``), continued on resume."""

    def __init__(self, run: Path, config: dict, project: str, ids: dict, mlflow_uri: str = "", **_):
        from mlflow.tracking import MlflowClient
        uri = mlflow_uri or (run / "mlruns").resolve().as_uri()
        self.client = MlflowClient(uri)
        saved = ids.get("mlflow") or {}
        self.run_id, old_params = None, {}
        if saved.get("uri") == uri and saved.get("run_id"):  # a resumed run: the same MLflow run
            try:
                old_params = self.client.get_run(saved["run_id"]).data.params
                self.run_id = saved["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            except Exception:  # deleted or moved: a new one below
                self.run_id = None
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(project)
            self.run_id = self.client.create_run(exp_id, run_name=run.name,
                                                 tags={"simclr.run_dir": str(run.resolve())}).info.run_id
        ids["mlflow"] = {"uri": uri, "run_id": self.run_id}
        self.where = f"MLflow run {self.run_id} in {uri}"
        self._log_params(config, old_params)

    def _log_params(self, config: dict, old: dict) -> None:
        """Params are the flattened config as strings, cut to MLflow's length limit. A param cannot change:
        a resume that changes one (--allow_config_change) records the new value as a tag."""
        from mlflow.entities import Param
        from mlflow.utils import validation
        limit = getattr(validation, "MAX_PARAM_VAL_LENGTH", 500)
        flat, new = _flatten(config), []
        for k, v in flat.items():
            text = str(v)[:limit]
            if k not in old:
                new.append(Param(k, text))
            elif old[k] != text:
                self.client.set_tag(self.run_id, f"changed.{k}", f"{old[k]} -> {text}"[:limit])
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def log(self, record: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        # MLflow keys allow letters, digits, _ - . space : / only (a class folder may be named otherwise)
        metrics = [Metric(re.sub(r"[^\w\-. :/]", "_", k), float(v), now, step) for k, v in scalars(record).items()
                   if k != "step" and math.isfinite(v)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def results(self, numbers: dict, full: dict, step: int, name: str) -> None:
        """The numbers as metrics ``final.<key>`` (apart from the metrics lines' histories), the whole as an
        artifact ``name``."""
        self.log({f"final.{k}": v for k, v in numbers.items()}, step)
        self.client.log_dict(self.run_id, json.loads(json.dumps(full, default=str)), name)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FINISHED"))


ADAPTERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------------------------
# the trackers of one run folder
# --------------------------------------------------------------------------------------------
class Trackers:
    """The trackers of one run folder. A call that fails warns once and turns that tracker off: the run
    folder's files stay complete, and a tracker must never stop training."""

    def __init__(self, run: Path, logger: str = "tensorboard", config: Optional[dict] = None, project: str = "",
                 mlflow_uri: str = ""):
        self.run, self.live = Path(run), {}
        ids = self._ids_of_this_folder()
        for name in parse_loggers(logger):
            self._call(name, lambda n=name: self.live.__setitem__(n, ADAPTERS[n](
                run=self.run, config=config or {}, project=project or self.run.parent.name, ids=ids,
                mlflow_uri=mlflow_uri)), starting=True)
        if ids and ids != self._read_ids():
            try:
                atomic_write(self.run / IDS_FILE, json.dumps(ids, indent=2))
            except (OSError, UserError) as e:  # only a later resume needs it: not a reason to stop this run
                log.warning(f"warning: could not write {self.run / IDS_FILE} ({e}); a resume will start new tracker "
                            f"runs")

    def _ids_of_this_folder(self) -> dict:
        """trackers.json's ids when they are this folder's. A copy of a run folder (``cp -r R R2`` while R stays)
        carries R's ids: continuing them would write R2's steps into R's W&B and MLflow runs, so the copy starts
        tracker runs of its own (``copied_from`` says whose ids it dropped). A folder moved away (R gone) and
        a trackers.json from before the folder was recorded keep theirs."""
        ids = self._read_ids()
        here = str(self.run.resolve())
        was = ids.get("run_dir")
        if isinstance(was, str) and was != here and (Path(was) / IDS_FILE).is_file():
            ids = {"copied_from": was}
        ids["run_dir"] = here
        return ids

    def _read_ids(self) -> dict:
        ids = read_small_json(self.run / IDS_FILE)
        return ids if isinstance(ids, dict) else {}

    def _call(self, name: str, fn: Callable[[], None], starting: bool = False) -> None:
        try:
            fn()
        except Exception as e:  # whatever a tracker raises (disk, protobuf, its service process): warn, turn off
            self.live.pop(name, None)
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            log.warning(f"warning: --logger {name} {'could not start' if starting else 'failed'} ({msg}); it is off "
                      f"for the rest of this run (the run folder's files are complete)")

    def describe(self) -> str:
        return "; ".join(t.where for t in self.live.values())

    def log(self, record: dict, step: int) -> None:
        for name, t in list(self.live.items()):
            self._call(name, lambda t=t: t.log(record, step))

    def results(self, results: dict, step: int, name: str = "results.json") -> None:
        """Final results (eval.json, or a pretraining run's summary): their numbers into W&B's summary and MLflow's
        ``final.*`` metrics (eval.json's config, data and encoder descriptions left out), the whole as an MLflow
        artifact ``name``."""
        numbers = scalars({k: v for k, v in results.items() if k not in ("config", "data", "encoder")})
        for n, t in list(self.live.items()):
            self._call(n, lambda t=t: t.results(numbers, results, step, name))

    def finish(self, status: str) -> None:
        for name, t in list(self.live.items()):
            self._call(name, lambda t=t: t.finish(status))
        self.live = {}
