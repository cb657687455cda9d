"""Experiment trackers (`report_to`): tensorboard, wandb (offline), mlflow (a local `file:` store).
Every tracker gets the same metric names and values as metrics.jsonl and the resolved config; an
optional tracker that is not installed fails at config time with its install command."""

from __future__ import annotations

import importlib.util
import json
import struct
import time
from pathlib import Path

import pytest

from rlhfkit.config import build_config
from rlhfkit.errors import ConfigError
from rlhfkit.train.tracking import MetricsLogger

BASE = {"model_name_or_path": "preset:tiny", "dataset": "d.jsonl", "output_dir": "o"}


def test_report_to_forms():
    assert build_config("sft", BASE).trackers == ["tensorboard"]                 # default
    assert build_config("sft", {**BASE, "report_to": "none"}).trackers == []
    assert build_config("sft", {**BASE, "report_to": []}).trackers == []
    assert build_config("sft", {**BASE, "report_to": "tensorboard"}).trackers == ["tensorboard"]
    installed = [t for t in ("wandb", "mlflow") if importlib.util.find_spec(t)]
    assert build_config("sft", {**BASE, "report_to": "all"}).trackers == ["tensorboard", *installed]
    with pytest.raises(ConfigError, match="report_to: 'wandbb' .*did you mean 'wandb'"):
        build_config("sft", {**BASE, "report_to": ["tensorboard", "wandbb"]})
    with pytest.raises(ConfigError, match="'comet_ml' is not a tracker rlhfkit supports"):
        build_config("sft", {**BASE, "report_to": "comet_ml"})


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_missing_tracker_fails_at_config_time_with_install_command(monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))
    with pytest.raises(ConfigError, match=rf"{name} is not installed: pip install 'rlhfkit\[{name}\]'"):
        build_config("sft", {**BASE, "report_to": ["tensorboard", name]})
    assert build_config("sft", {**BASE, "report_to": "all"}).trackers.count(name) == 0   # all: the installed ones


RECORDS = [(1, {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "epoch": 0.5}),
           (2, {"loss": 2.0, "lr": 5e-4, "grad_norm": float("nan"), "epoch": 1.0, "eval/loss": 2.25,
                "eval/accuracy": 0.5})]
CONFIG = {"stage": "sft", "learning_rate": 1e-3, "lora_target": ["q_proj", "v_proj"], "template": "qwen"}


def _log(out: Path, trackers: list[str]) -> MetricsLogger:
    out.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(out, trackers=trackers, config=CONFIG, run_name="unit")
    for step, metrics in RECORDS:
        logger.log(step, metrics)
    (out / "summary.json").write_text(json.dumps({"eval/loss": 2.25, "train_runtime": 3.0}))
    logger.close()
    return logger


def _expected() -> dict[str, dict[int, float]]:
    """metric -> {step: value}: what every tracker must hold (NaN is not logged)."""
    out: dict[str, dict[int, float]] = {}
    for step, metrics in RECORDS:
        for k, v in metrics.items():
            if v == v:
                out.setdefault(k, {})[step] = v
    return out


def test_tensorboard_gets_the_metrics_jsonl_names(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log(tmp_path, ["tensorboard"])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and lines[1]["grad_norm"] is None
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    got = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    assert got.keys() == _expected().keys()
    for tag, values in _expected().items():
        assert got[tag] == pytest.approx(values)


def test_mlflow_file_store_gets_metrics_params_and_summary(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "store").resolve().as_uri()           # a local file: store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "rlhfkit-test")
    logger = _log(tmp_path / "run", ["mlflow"])
    assert logger.trackers == {}                            # closed
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("rlhfkit-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "unit" and run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["lora_target"] == '["q_proj", "v_proj"]'
    for key, values in _expected().items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx(values), key
    assert set(run.data.metrics) == set(_expected())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "summary.json" in artifacts


def _wandb_records(run_dir: Path, timeout: float = 60.0) -> list:
    """Records of an offline run's .wandb file, once its `exit` record is there: wandb's service
    process writes the file after `finish()` returns (seen with wandb 0.31 offline)."""
    deadline = time.monotonic() + timeout
    while True:
        records = _read_wandb_file(next(run_dir.glob("*.wandb")))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _read_wandb_file(path: Path) -> list:
    """A .wandb file's records (a LevelDB-style log: 7-byte file header, 32 KiB blocks, each record
    chunk with a 7-byte header crc32/length/type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    chunks, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            chunks.append(pending)
    records = []
    for raw in chunks:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def test_wandb_offline_gets_metrics_config_and_summary(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "rlhfkit-test")
    _log(tmp_path, ["wandb"])
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    records = _wandb_records(run_dir)
    history: dict[str, dict[int, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for k, v in items.items():
                if not k.startswith("_"):
                    history.setdefault(k, {})[items["_step"]] = v
    assert history.keys() == _expected().keys()
    for key, values in _expected().items():
        assert history[key] == pytest.approx(values), key
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "unit" and run.project == "rlhfkit-test"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["learning_rate"] == 1e-3 and config["template"] == "qwen"
    summary = {i.key: i.value_json for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update if i.key}
    assert json.loads(summary["train_runtime"]) == 3.0


@pytest.mark.slow
def test_sft_run_reports_to_every_tracker_with_the_same_names(tmp_path, monkeypatch):
    """A short SFT run with report_to [tensorboard, wandb, mlflow]: each holds metrics.jsonl's names."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhfkit.tasks import get_task
    from rlhfkit.train.sft import train_sft

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    paths = get_task("sentiment").write(tmp_path / "data", seed=0)
    out = tmp_path / "run"
    config = build_config("sft", {"model_name_or_path": "preset:tiny", "dataset": str(paths["sft_train"]),
                                  "output_dir": str(out), "max_steps": 3, "max_samples": 64, "val_size": 8,
                                  "eval_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 8,
                                  "max_length": 48, "disable_tqdm": True, "run_name": "e2e",
                                  "report_to": ["tensorboard", "wandb", "mlflow"]})
    train_sft(config)
    names = {k for line in (out / "metrics.jsonl").read_text().splitlines() for k, v in json.loads(line).items()
             if k != "step" and isinstance(v, (int, float))}
    assert {"loss", "lr", "grad_norm", "eval/loss"} <= names
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == names
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())   # the default store
    (run,) = client.search_runs([client.get_experiment_by_name("rlhfkit").experiment_id])
    assert set(run.data.metrics) == names and run.data.params["stage"] == "sft"
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    logged = {i.key or "/".join(i.nested_key) for r in _wandb_records(run_dir)
              if r.WhichOneof("record_type") == "history" for i in r.history.item}
    assert {k for k in logged if not k.startswith("_")} == names
