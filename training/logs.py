"""What a run tells its user: a progress bar, CSV logs, TensorBoard (when installed) and a PNG of the curves.

RUN/train.csv has one row per logged optimiser step; RUN/eval.csv one row per (step, eval set, metric);
RUN/curves.png is drawn from both at the end. Only rank 0 makes a RunLogger that writes anything.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

__all__ = ["RunLogger", "TRAIN_COLUMNS", "plot_curves", "read_csv_rows"]

TRAIN_COLUMNS = ("step", "epoch", "batch", "loss", "lr", "logit_scale", "temperature", "grad_norm", "samples_per_s",
                 "elapsed_s")
EVAL_COLUMNS = ("step", "set", "metric", "value")


def read_csv_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV log (empty when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _truncate_after(path: Path, columns: tuple[str, ...], step: int) -> None:
    """Drop rows logged after `step` (a resumed run re-logs them) by rewriting the file atomically."""
    rows = [row for row in read_csv_rows(path) if int(row["step"]) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class _CsvLog:
    def __init__(self, path: Path, columns: tuple[str, ...], resume_step: int | None):
        self.path, self.columns = path, columns
        if resume_step is not None and path.is_file():
            _truncate_after(path, columns, resume_step)
        fresh = not path.is_file() or path.stat().st_size == 0
        self.file = open(path, "a" if not fresh else "w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, fieldnames=columns, extrasaction="ignore")
        if fresh:
            self.writer.writeheader()

    def write(self, row: Mapping[str, Any]) -> None:
        # repr keeps every bit of a float, so logs can be compared exactly (the resume test relies on it)
        self.writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class RunLogger:
    """Progress bar + CSV + TensorBoard for one run (rank 0); `enabled=False` makes every call a no-op."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = True, resumed: bool = False):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.bar = None
        self.tb = None
        if not enabled:
            return
        resume_step = start_step if resumed else None
        self.train_log = _CsvLog(self.run_dir / "train.csv", TRAIN_COLUMNS, resume_step)
        self.eval_log = _CsvLog(self.run_dir / "eval.csv", EVAL_COLUMNS, resume_step)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional: CSV and the PNG carry the same numbers
                log.debug("tensorboard is not installed; logging to CSV only")
            else:
                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step if resumed else None)

    def step(self, row: Mapping[str, Any], *, write: bool = True) -> None:
        """Advance the bar by one optimiser step; with `write`, log the row (TRAIN_COLUMNS) to CSV/TensorBoard."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", T=f"{row['temperature']:.4f}",
                                 sps=f"{row['samples_per_s']:.1f}", refresh=False)
            self.bar.update(1)
        if write:
            self.train_log.write(row)
            if self.tb is not None:
                for key in ("loss", "lr", "logit_scale", "temperature", "grad_norm", "samples_per_s"):
                    value = row.get(key)
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        self.tb.add_scalar(f"train/{key}", value, row["step"])

    def eval(self, step: int, set_name: str, metrics: Mapping[str, float]) -> None:
        """Log one eval set's metrics at `step`."""
        if not self.enabled:
            return
        for metric, value in metrics.items():
            if isinstance(value, (int, float)):
                self.eval_log.write({"step": step, "set": set_name, "metric": metric, "value": float(value)})
                if self.tb is not None:
                    self.tb.add_scalar(f"eval/{set_name}/{metric}", value, step)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        message = f"eval step {step} {set_name}: {shown}"
        if self.bar is not None:
            self.bar.write(message)
        log.info(message)

    def message(self, text: str) -> None:
        """A line above the progress bar (or in the log)."""
        if self.enabled and self.bar is not None:
            self.bar.write(text)
        log.info(text)

    def close(self, *, plot: bool = True) -> Path | None:
        """Close the bar and files; draw RUN/curves.png when asked. Returns the PNG path (None if none was drawn)."""
        if not self.enabled:
            return None
        if self.bar is not None:
            self.bar.close()
        self.train_log.close()
        self.eval_log.close()
        if self.tb is not None:
            self.tb.close()
        if not plot:
            return None
        try:
            return plot_curves(self.run_dir)
        except Exception as e:  # noqa: BLE001 - a failed plot must not lose a finished run
            log.warning("could not draw the training curves: %s", e)
            return None


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Draw loss (and lr) over steps beside every eval metric over steps from a run's CSV logs into a PNG."""
    run_dir = Path(run_dir)
    train_rows = read_csv_rows(run_dir / "train.csv")
    eval_rows = read_csv_rows(run_dir / "eval.csv")
    if not train_rows and not eval_rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in eval_rows:
        xs, ys = series.setdefault(f"{row['set']} {row['metric']}", ([], []))
        xs.append(int(row["step"]))
        ys.append(float(row["value"]))
    panels = 2 if series else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    if train_rows:
        steps = [int(r["step"]) for r in train_rows]
        ax.plot(steps, [float(r["loss"]) for r in train_rows], label="loss", color="tab:blue")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("training loss")
        ax.grid(alpha=0.3)
        lr_axis = ax.twinx()
        lr_axis.plot(steps, [float(r["lr"]) for r in train_rows], color="tab:orange", alpha=0.6, label="lr")
        lr_axis.set_ylabel("learning rate", color="tab:orange")
    if series:
        ax = axes[0][1]
        for label, (xs, ys) in sorted(series.items()):
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("metric")
        ax.set_title("evaluation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out
