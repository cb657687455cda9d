"""Run outputs: metrics.jsonl, TensorBoard events, plots, summary.json, progress bars."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm.auto import tqdm


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


class MetricsLogger:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors it to TensorBoard.
    Only the main process writes."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.path = self.dir / "metrics.jsonl"
        self.history: list[dict] = []
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Keep what was logged up to the checkpoint; later lines are replayed by the run.
            kept = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.history = [r for r in kept if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.dir / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.history.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

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
