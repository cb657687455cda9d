"""Run outputs: metrics.jsonl, experiment trackers (TensorBoard, wandb, mlflow), plots, summary.json,
progress bars.

`MetricsLogger` writes every logged record to metrics.jsonl and mirrors it, under the same metric
names, to the trackers of `report_to`. wandb and mlflow are optional extras, imported only when
named; `check_trackers` fails at start (before any model loads) with the install command when one
is missing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from rlhfkit.data.sources import jsonl_records


def progress(iterable=None, *, disable: bool | None = None, **kwargs):
    """tqdm that is quiet when stderr is not a terminal (unless `disable` says otherwise)."""
    if disable is None:
        disable = not sys.stderr.isatty()
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)


def _clean(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


# tracker -> (module to import, pip install command)
OPTIONAL_TRACKERS = {"wandb": ("wandb", "pip install 'rlhfkit[wandb]'"),
                     "mlflow": ("mlflow", "pip install 'rlhfkit[mlflow]'")}


def check_trackers(names: list[str]) -> None:
    """Raise ConfigError naming the install command for every optional tracker that is missing."""
    from rlhfkit.errors import ConfigError

    missing = [n for n in names if n in OPTIONAL_TRACKERS and importlib.util.find_spec(OPTIONAL_TRACKERS[n][0]) is None]
    if missing:
        raise ConfigError("report_to: " + "; ".join(f"{n} is not installed: {OPTIONAL_TRACKERS[n][1]}" for n in missing))


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_params(config: dict, limit: int = 500) -> dict[str, str]:
    """The resolved config as flat string parameters (lists and mappings as JSON, long values cut)."""
    out = {}
    for key, value in config.items():
        text = value if isinstance(value, str) else json.dumps(value)
        out[key] = text if len(text) <= limit else text[:limit - 3] + "..."
    return out


class TensorBoardTracker:
    def __init__(self, output_dir: Path, resume_step: int | None, **_):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, summary: dict | None) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run (project `WANDB_PROJECT`, default `rlhfkit`) under output_dir/wandb; every
    wandb setting comes from its environment variables (`WANDB_MODE=offline` works offline)."""

    def __init__(self, output_dir: Path, run_name: str, config: dict, **_):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlhfkit"), name=run_name,
                              dir=str(output_dir), config=config, reinit="create_new")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self, summary: dict | None) -> None:
        if summary:
            self.run.summary.update(_numbers(summary))
        self.run.finish()


class MlflowTracker:
    """An mlflow run in experiment `MLFLOW_EXPERIMENT_NAME` (default `rlhfkit`) at
    `MLFLOW_TRACKING_URI`, default the local file store `file:output_dir/mlruns`. mlflow >= 3 refuses
    file stores unless MLFLOW_ALLOW_FILE_STORE=true: rlhfkit sets that for a `file:` URI and says so.
    Uses an MlflowClient (no global active run). The config is logged as parameters; at the end
    summary.json and plots/ as artifacts."""

    def __init__(self, output_dir: Path, run_name: str, config: dict, **_):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (output_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") and os.environ.get("MLFLOW_ALLOW_FILE_STORE") is None:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
            print(f"mlflow: logging to the file store {uri} (MLFLOW_ALLOW_FILE_STORE=true set for it; "
                  "set MLFLOW_TRACKING_URI for a server or database)", flush=True)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "rlhfkit")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.output_dir = output_dir
        params = [Param(k, v) for k, v in flat_params(config).items()]
        for i in range(0, len(params), 100):  # mlflow's batch limit is 100 params
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, summary: dict | None) -> None:
        for path in (self.output_dir / "summary.json", self.output_dir / "plots"):
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
            elif path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path="plots")
        self.client.set_terminated(self.run_id)


TRACKER_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class MetricsLogger:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors it, under the same names,
    to the trackers (`report_to`: tensorboard, wandb, mlflow). Only the main process writes.
    `config` (the resolved config) is logged as the trackers' parameters; `close()` ends them."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None, trackers: list[str] | None = None,
                 config: dict | None = None, run_name: str | None = None):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.path = self.dir / "metrics.jsonl"
        self.history: list[dict] = []
        self.trackers: dict[str, object] = {}
        if trackers is None:
            trackers = ["tensorboard"] if tensorboard else []
        if not enabled:
            return
        check_trackers(trackers)
        if resume_step is not None and self.path.exists():
            # Keep what was logged up to the checkpoint; later lines are replayed by the run.
            kept = jsonl_records(self.path)
            self.history = [r for r in kept if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        elif self.path.exists():
            self.path.unlink()
        for name in trackers:
            self.trackers[name] = TRACKER_CLASSES[name](self.dir, resume_step=resume_step, config=config or {},
                                                        run_name=run_name or self.dir.resolve().name)

    @property
    def writer(self):
        """The TensorBoard SummaryWriter, or None."""
        tb = self.trackers.get("tensorboard")
        return tb.writer if tb is not None else None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.history.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = _numbers(record)
        if numbers:
            for tracker in self.trackers.values():
                tracker.log(step, numbers)

    def close(self) -> None:
        """End every tracker (wandb: summary from summary.json, then finish; mlflow: summary.json and
        plots as artifacts, run terminated). Call after write_summary and plot."""
        summary_path = self.dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        trackers, self.trackers = self.trackers, {}
        for tracker in trackers.values():
            tracker.close(summary)

    def plot(self, keys: list[str] | None = None) -> Path | None:
        """plots/loss.png: training (and eval) loss against step, plus one panel per extra key."""
        if not self.enabled or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [("loss", ["loss", "eval/loss"])] + [(k, [k]) for k in (keys or [])]
        panels = [(t, ks) for t, ks in panels if any(k in r for r in self.history for k in ks)]
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
        for ax, (title, ks) in zip(axes[0], panels):
            for k in ks:
                pts = [(r["step"], r[k]) for r in self.history if r.get(k) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None, label=k)
            ax.set_xlabel("step")
            ax.set_title(title)
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.dir / "plots" / "loss.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


def write_summary(output_dir: str | Path, summary: dict) -> Path:
    path = Path(output_dir) / "summary.json"
    path.write_text(json.dumps({k: _clean(v) for k, v in summary.items()}, indent=2) + "\n")
    return path
