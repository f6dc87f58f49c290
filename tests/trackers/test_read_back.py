"""--logger tensorboard,wandb,mlflow: what the trackers hold, read back with the trackers' own readers, equals the
run folder's metrics.jsonl / eval.json; a resumed run continues the same W&B and MLflow runs; a tracker that is not
installed stops the job before it starts; one that fails mid-run is switched off and training goes on."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli, tiny_args
from simclr import config as config_lib
from simclr.options import PretrainConfig
from simclr.runs import read_metrics
from tests.checkpoint.test_crash_safety import tiny_cifar_folder

ENV = {"OMP_NUM_THREADS": "1"}  # MLflow's file-store switch is the simclr command's to set


@pytest.fixture(scope="module")
def folder(data_root, tmp_path_factory) -> Path:
    return tiny_cifar_folder(tmp_path_factory.mktemp("tiny-cifar"), data_root)


def args(tmp: Path, folder: Path, **over) -> list:
    """64 real CIFAR-10 images of 4 classes, batch 16, ResNet-18 of width 8, a log line every step."""
    base = dict(data="folder", data_path=folder, image_size=32, train_subset=0, test_subset=0, batch_size=16,
                iters=4, knn_k=20)
    base.update(over)
    return tiny_args(tmp, **base)


def wandb_records(path: Path) -> list:
    """The records of a W&B ``.wandb`` file as (type, record). wandb 0.31 ships no Python reader of its own (its
    Go core reads them), so the framing is read here: a 7-byte header (':W&B', magic, version), then LevelDB's
    log format (32 KiB blocks, each chunk with crc32c, length, type full/first/middle/last); the records are
    wandb's own protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    out, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 2):
            buf = chunk
        elif kind in (3, 4):
            buf += chunk
        else:
            break
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append((rec.WhichOneof("record_type"), rec))
    return out


def _items(items) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def wandb_run(offline_dir: Path) -> dict:
    """One offline run: its id, project, name, config, history rows and final summary values."""
    (file,) = offline_dir.glob("run-*.wandb")
    run, history, summary = None, [], {}
    for kind, rec in wandb_records(file):
        if kind == "run":
            run = rec.run
        elif kind == "history":
            history.append(_items(rec.history.item))
        elif kind == "summary":
            summary.update(_items(rec.summary.update))
    return {"id": run.run_id, "project": run.project, "name": run.display_name, "config": _items(run.config.update),
            "history": history, "summary": summary}


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient
    return MlflowClient((run_dir / "mlruns").resolve().as_uri())  # the documented default store


@pytest.mark.slow
def test_pretrain_resume_and_knn_reach_every_tracker(tmp_path, folder, monkeypatch):
    logger = ["--logger", "tensorboard,wandb,mlflow"]
    r = run_cli("pretrain", *args(tmp_path, folder, stop_after=2, online_probe="true"), *logger, env=ENV)
    assert r.returncode == 0 and "status: interrupted at step 2" in r.stdout, r.stderr
    run = next((tmp_path / "logs" / "t").iterdir())
    r = run_cli("pretrain", "--resume", run, *logger, env=ENV)
    assert r.returncode == 0 and "status: finished at step 4" in r.stdout, r.stderr
    r = run_cli("knn", "--encoder_ckpt", run, "--data", "folder", "--data_path", folder, "--k", 20, "--workers", 0,
                "--root", tmp_path / "logs", "--name", "e", "--verbose", "false", "--logger", "wandb,mlflow", env=ENV)
    assert r.returncode == 0, r.stderr
    assert "warning" not in (run / "log.txt").read_text()

    lines = [m for m in read_metrics(run) if "loss" in m]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    loss = [(m["step"], m["loss"]) for m in lines]
    probe = [(m["step"], m["online_linear_top1"]) for m in lines]
    knn = [(m["step"], m["knn_top1"]) for m in read_metrics(run) if "knn_top1" in m]
    assert knn and knn[-1][0] == 4

    # MLflow: one run (the resume continued it), every metrics line at its step, the config as params
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this process's reader
    client = mlflow_client(run)
    exp = client.get_experiment_by_name("t")
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.info.run_name == run.name and mrun.info.status == "FINISHED"
    history = {k: [(m.step, m.value) for m in client.get_metric_history(mrun.info.run_id, k)]
               for k in ("loss", "online_linear_top1", "knn_top1")}
    assert history == {"loss": loss, "online_linear_top1": probe, "knn_top1": knn}
    assert mrun.data.params["lr"] == "0.5" and mrun.data.params["batch_size"] == "16"
    assert mrun.data.metrics["final.knn_top1"] == knn[-1][1]

    # W&B: two offline runs (the first invocation and the resume) of one W&B run id
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2
    first, second = wandb_run(offline[0]), wandb_run(offline[1])
    assert first["id"] == second["id"] and offline[0].name.endswith(first["id"])
    assert (first["project"], first["name"]) == ("t", run.name)
    assert first["config"]["lr"] == 0.5 and first["config"]["batch_size"] == 16
    rows = [h for h in first["history"] + second["history"] if "loss" in h]
    assert [(h["_step"], h["loss"]) for h in rows] == loss
    assert [(h["_step"], h["online_linear_top1"]) for h in rows] == probe
    assert second["summary"]["knn_top1"] == knn[-1][1] and second["summary"]["loss"] == loss[-1][1]

    # TensorBoard, as before the trackers moved out of the run-folder writer (event values are float32)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(run / "tb"))
    tb.Reload()
    assert [(e.step, e.value) for e in tb.Scalars("loss")] == [(s, pytest.approx(v, rel=1e-6)) for s, v in loss]

    # the kNN evaluation's eval.json: W&B's summary and MLflow's final metrics and artifact
    erun = next((tmp_path / "logs" / "e").iterdir())
    result = json.loads((erun / "eval.json").read_text())
    (ew,) = (erun / "wandb").glob("offline-run-*")
    assert wandb_run(ew)["summary"]["top1"] == result["top1"]
    client = mlflow_client(erun)
    (emrun,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert emrun.data.metrics["final.top1"] == result["top1"]
    artifact = Path(client.download_artifacts(emrun.info.run_id, "eval.json", str(tmp_path)))
    assert json.loads(artifact.read_text())["per_class"] == result["per_class"]


@pytest.mark.parametrize("command,name", [("pretrain", "wandb"), ("knn", "mlflow")])
def test_a_tracker_that_is_not_installed_stops_the_job_before_it_starts(tmp_path, folder, command, name):
    shim = tmp_path / "shim" / name
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(f"raise ImportError('No module named {name!r} (hidden by the test)')\n")
    argv = args(tmp_path, folder) if command == "pretrain" else [
        "--data", "folder", "--data_path", folder, "--root", tmp_path / "logs", "--workers", 0]
    r = run_cli(command, *argv, "--logger", f"tensorboard,{name}",  # a new interpreter: the shim hides the package
                env={"PYTHONPATH": f"{tmp_path / 'shim'}:{REPO / 'src'}"}, subprocess=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --logger ")
    assert f'pip install "simclr-torch[{name}]"' in lines[0]
    assert not (tmp_path / "logs").exists()  # nothing written: no run folder


def test_a_tracker_failing_mid_run_is_switched_off_with_one_warning(tmp_path, folder, monkeypatch):
    """MLflow's client raises from the second metrics line on: the run finishes with every line in metrics.jsonl,
    one warning, and no further MLflow call."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient
    from simclr.train import pretrain
    real, calls = MlflowClient.log_batch, []

    def log_batch(self, run_id, metrics=(), **kw):
        if metrics:
            calls.append(metrics[0].step)
            if len(calls) >= 2:
                raise OSError("the tracking store went away")
        return real(self, run_id, metrics=metrics, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    torch.manual_seed(0)
    cfg, _ = config_lib.parse(PretrainConfig, args(tmp_path, folder, iters=3, logger="mlflow"))
    res = pretrain(cfg)
    run = Path(res["run_dir"])
    assert res["status"] == "finished" and [m["step"] for m in read_metrics(run) if "loss" in m] == [1, 2, 3]
    assert calls == [1, 2]  # nothing more after the failure (not the kNN line, not the final results)
    log = (run / "log.txt").read_text()
    assert log.count("warning: --logger mlflow failed") == 1 and "the tracking store went away" in log
    history = mlflow_client(run).get_metric_history(json.loads((run / "trackers.json").read_text())
                                                    ["mlflow"]["run_id"], "loss")
    assert [m.step for m in history] == [1]


def test_a_copied_run_folder_gets_tracker_runs_of_its_own_while_a_moved_one_keeps_them(tmp_path, monkeypatch):
    """cp -r R R2 (R stays) must not continue R's W&B / MLflow runs from R2; R resumed, or R moved, continues."""
    from simclr import trackers

    seen = []

    class Fake:  # what WandB and MLflow do with the ids: keep the ones there, make one when there is none
        def __init__(self, run, ids, **_):
            ids.setdefault("tracker_run", f"id-{len(seen)}")
            seen.append((Path(run).name, ids["tracker_run"]))

        def finish(self, status):
            pass

    monkeypatch.setitem(trackers.ADAPTERS, "wandb", Fake)
    original = tmp_path / "R"
    original.mkdir()
    trackers.Trackers(original, "wandb")
    shutil.copytree(original, tmp_path / "R2")
    trackers.Trackers(tmp_path / "R2", "wandb")   # the copy
    trackers.Trackers(original, "wandb")          # the original resumed
    shutil.move(str(original), str(tmp_path / "R3"))
    trackers.Trackers(tmp_path / "R3", "wandb")   # the original moved away
    assert seen == [("R", "id-0"), ("R2", "id-1"), ("R", "id-0"), ("R3", "id-0")]
    copied = json.loads((tmp_path / "R2" / trackers.IDS_FILE).read_text())
    assert copied["copied_from"] == str(original.resolve()) and copied["run_dir"] == str((tmp_path / "R2").resolve())
