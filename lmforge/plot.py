"""Training curves of a run directory: loss (per objective when there are several, evaluation
losses as markers), learning rate and throughput, read from its `metrics.jsonl`.

Drawn with matplotlib's Agg canvas (no display, no pyplot state), written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

METRICS_FILE = "metrics.jsonl"
TITLES = ("loss", "learning rate", "throughput")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl`, one per logged step and kind, by step. A step
    logged twice (a run resumed from an earlier checkpoint) keeps its latest values. A torn last
    line (a run still writing) is skipped; any other bad line is an error naming it."""
    path = Path(run_dir) / METRICS_FILE
    if not Path(run_dir).is_dir():
        raise LmforgeError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise LmforgeError(f"{path}: missing; plot needs a run directory a stage has logged to")
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                break  # being written right now
            raise LmforgeError(f"{path} line {i}: not valid JSON; the file is corrupt") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise LmforgeError(f"{path} line {i}: a record without an integer 'step'")
        records.append(record)
    return records


def curves(records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """metric name -> {step: value} for every numeric metric (later records win)."""
    out: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and value == value:  # not NaN
                out.setdefault(key, {})[record["step"]] = float(value)
    return out


def _loss_keys(series: dict[str, dict[int, float]]) -> tuple[list[str], list[str]]:
    """Training loss keys (per objective when there are several) and evaluation loss keys."""
    objectives = sorted(k for k in series if k.startswith("loss/"))
    train = objectives if len(objectives) > 1 else ["loss"] if "loss" in series else objectives
    evals = sorted(k for k in series if k.startswith("eval/") and k.endswith("loss"))
    return train, evals


def plot_run(run_dir: str | Path) -> Any:
    """A matplotlib Figure with three panels: loss, learning rate, tokens/s against step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(run_dir)
    series = curves(records)
    train_keys, eval_keys = _loss_keys(series)
    if not train_keys and not eval_keys:
        raise LmforgeError(
            f"{Path(run_dir) / METRICS_FILE}: no loss has been logged yet; "
            "plot again after the first tracking.log_every steps"
        )
    fig = Figure(figsize=(13, 4), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax, tps_ax = fig.subplots(1, 3)
    for key in train_keys:
        steps = sorted(series[key])
        label = "train" if key == "loss" else f"train {key.split('/', 1)[1]}"
        loss_ax.plot(steps, [series[key][s] for s in steps], label=label)
    for key in eval_keys:
        steps = sorted(series[key])
        label = key.removesuffix("/loss").replace("/", " ")
        loss_ax.plot(steps, [series[key][s] for s in steps], "o--", label=label)
    loss_ax.legend(fontsize="small")
    for ax, key, ylabel in ((lr_ax, "lr", "learning rate"), (tps_ax, "tokens_per_s", "tokens/s")):
        if key in series:
            steps = sorted(series[key])
            ax.plot(steps, [series[key][s] for s in steps])
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(ylabel)
    loss_ax.set_ylabel("loss")
    for ax, title in zip((loss_ax, lr_ax, tps_ax), TITLES, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).resolve().name)
    return fig


def save_plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw `run_dir`'s curves into a PNG (default run_dir/curves.png), atomically."""
    fig = plot_run(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / "curves.png"
    if not path.parent.is_dir():
        raise LmforgeError(f"{path}: folder {path.parent} does not exist")
    kind = path.suffix.lstrip(".").lower() or "png"
    if kind not in fig.canvas.get_supported_filetypes():
        raise LmforgeError(f"{path}: cannot write .{kind} images; use .png, .svg or .pdf")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format=kind, dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
