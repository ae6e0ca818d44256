"""The curves of one or more runs, read from their `metrics.jsonl`: per stage, the panels of what
that stage measures (training and held-out loss; reward, KL, response length and generation share
for GRPO and PPO; exact match; pair accuracy and margins for the reward model and DPO; learning
rate and throughput), several runs overlaid in one figure, one colour per run.

A run's stage is read from its newest checkpoint's lmforge.json, or told by the metrics it logs
(a run still before its first save). Panels of the same title are shared across runs and stages.
Drawn with matplotlib's Agg canvas (no display, no pyplot state), written atomically.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

METRICS_FILE = "metrics.jsonl"
LOSS = "loss"  # the training-loss panel, whose curves depend on the objectives a run logs


@dataclass(frozen=True)
class Panel:
    """One panel: its title and y label, the training curves (drawn as lines) and the held-out
    evaluations (drawn as markers). A key is a metric name or an fnmatch pattern; a (key, label)
    pair names its curve in the legend."""

    title: str
    ylabel: str
    train: tuple[str | tuple[str, str], ...] = ()
    evals: tuple[str | tuple[str, str], ...] = ()


_LR = Panel("learning rate", "learning rate", ("lr",))
_TPS = Panel("throughput", "tokens/s", ("tokens_per_s",))
_EXACT = Panel("held-out exact match", "accuracy", evals=("eval/accuracy",))
_RL = (
    Panel("reward", "mean reward", ("reward",), ("eval/reward",)),
    Panel("response length", "tokens", ("response_length",)),
)
_GEN = Panel("generation share", "share of the step", ("time/generation_share",))

# What each stage measures, in drawing order (the loss panel comes first for every stage).
STAGE_PANELS: dict[str, tuple[Panel, ...]] = {
    "pretrain": (_LR, _TPS),
    "sft": (_EXACT, _LR, _TPS),
    "reward": (
        Panel("pair accuracy", "accuracy", ("accuracy",), ("eval/accuracy",)),
        Panel("reward margin", "chosen - rejected", ("margin",), ("eval/margin",)),
        _LR,
        _TPS,
    ),
    "dpo": (
        Panel("pair accuracy", "accuracy", ("accuracy",), ("eval/reward_accuracy",)),
        Panel("reward margin", "chosen - rejected", ("margin",), ("eval/reward_margin",)),
        Panel("log-prob margin", "nats", evals=("eval/logp_margin",)),
        _LR,
        _TPS,
    ),
    "grpo": (
        _RL[0],
        # The step's KL is GRPO's per-token k3 term; the evaluation's is summed over a response.
        Panel("KL to the reference", "nats", (("kl", "train, per token"),), ("eval/kl",)),
        _RL[1],
        _EXACT,
        _GEN,
        _LR,
    ),
    "ppo": (
        _RL[0],
        Panel("KL to the reference", "nats", (("kl", "train"),), ("eval/kl",)),
        _RL[1],
        _EXACT,
        Panel("value loss", "loss", ("value_loss",)),
        _GEN,
        _LR,
    ),
}


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
            if isinstance(value, (int, float)) and math.isfinite(value):
                out.setdefault(key, {})[record["step"]] = float(value)
    return out


def run_stage(run_dir: Path, series: dict[str, dict[int, float]]) -> str:
    """The run's stage: its newest checkpoint's, else the one its metrics belong to."""
    try:
        name = (run_dir / "latest").read_text(encoding="utf-8").strip()
        stage = json.loads((run_dir / name / "lmforge.json").read_text(encoding="utf-8"))["stage"]
        if stage in STAGE_PANELS:
            return str(stage)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no checkpoint yet: tell by what it logs
    if "value_loss" in series or "kl_coef" in series:
        return "ppo"
    if "response_length" in series:
        return "grpo"
    if "eval/reward_accuracy" in series or "reward_chosen" in series:
        return "dpo"
    if "margin" in series or "eval/margin" in series:
        return "reward"
    if "eval/accuracy" in series:
        return "sft"
    return "pretrain"


def _loss_keys(series: dict[str, dict[int, float]]) -> tuple[list[str], list[str]]:
    """Training loss keys (per objective when there are several) and evaluation loss keys."""
    objectives = sorted(k for k in series if k.startswith("loss/"))
    train = objectives if len(objectives) > 1 else ["loss"] if "loss" in series else objectives
    evals = sorted(k for k in series if k.startswith("eval/") and k.endswith("loss"))
    return train, evals


def _loss_label(key: str, held_out: bool) -> str:
    """'train', 'train mlm', 'held-out', 'held-out causal' for a loss key."""
    if held_out:
        inner = key.removeprefix("eval/").removesuffix("loss").strip("/")
        return f"held-out {inner.replace('/', ' ')}".strip()
    return "train" if key == "loss" else f"train {key.split('/', 1)[1]}"


def _matches(
    specs: tuple[str | tuple[str, str], ...], series: dict[str, dict[int, float]], default: str
) -> list[tuple[str, str]]:
    """(key, legend label) of every logged metric a panel's specs name."""
    found: list[tuple[str, str]] = []
    for spec in specs:
        pattern, label = spec if isinstance(spec, tuple) else (spec, default)
        found += [(k, label) for k in sorted(series) if fnmatch(k, pattern)]
    return found


@dataclass
class _Run:
    """One run to draw: its legend name, stage and curves."""

    name: str
    stage: str
    series: dict[str, dict[int, float]]


def _lines(title: str, run: _Run) -> list[tuple[str, str, bool]]:
    """(key, label, held-out) of the curves `run` draws in the panel `title`: its own stage's
    keys (stages log different keys under one title), none when its stage has no such panel."""
    if title == LOSS:
        train, evals = _loss_keys(run.series)
        return [(k, _loss_label(k, False), False) for k in train] + [
            (k, _loss_label(k, True), True) for k in evals
        ]
    spec = next((p for p in STAGE_PANELS[run.stage] if p.title == title), None)
    if spec is None:
        return []
    train = _matches(spec.train, run.series, "train")
    evals = _matches(spec.evals, run.series, "held-out")
    return [(k, label, False) for k, label in train] + [(k, label, True) for k, label in evals]


def _names(run_dirs: Sequence[Path]) -> list[str]:
    """Legend names: each run directory's name, or its path where two names are the same."""
    names = [p.resolve().name for p in run_dirs]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, run_dirs, strict=True)]


def _panels(runs: list[_Run]) -> list[tuple[str, str]]:
    """(title, y label) of the panels to draw: the runs' stages' panels, shared by title, that
    at least one run has logged a curve of."""
    order: dict[str, str] = {LOSS: "loss"}
    for run in runs:
        for spec in STAGE_PANELS[run.stage]:
            order.setdefault(spec.title, spec.ylabel)
    return [(t, y) for t, y in order.items() if any(_lines(t, run) for run in runs)]


def plot_runs(run_dirs: Sequence[str | Path]) -> Any:
    """A matplotlib Figure with one panel per curve the runs' stages measure (see the module),
    each run in its own colour; the panel titles are the axes' titles."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    dirs = [Path(d) for d in run_dirs]
    runs = []
    for path, name in zip(dirs, _names(dirs), strict=True):
        series = curves(read_metrics(path))
        runs.append(_Run(name, run_stage(path, series), series))
    panels = _panels(runs)
    if not panels or panels[0][0] != LOSS:
        where = ", ".join(str(d / METRICS_FILE) for d in dirs)
        raise LmforgeError(
            f"{where}: no loss has been logged yet; plot again after the first "
            "tracking.log_every steps"
        )
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.4 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[len(panels) :]:
        ax.remove()  # an empty cell of the grid
    for ax, (title, ylabel) in zip(axes, panels, strict=False):
        _draw(ax, title, ylabel, runs)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(" vs ".join(f"{r.name} ({r.stage})" for r in runs))
    return fig


def _draw(ax: Any, title: str, ylabel: str, runs: list[_Run]) -> None:
    """One panel: every run's curves in its colour, lines for training (one line style per
    objective), dashed markers for held-out evaluations."""
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        for n, (key, label, held_out) in enumerate(_lines(title, run)):
            steps = sorted(run.series[key])
            values = [run.series[key][s] for s in steps]
            name = label if len(runs) == 1 else f"{run.name} {label}"
            style = "o--" if held_out else styles[n % len(styles)]
            ax.plot(steps, values, style, color=colour, label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_run(run_dir: str | Path) -> Any:
    """`plot_runs` of one run."""
    return plot_runs([run_dir])


def save_plot(run_dirs: str | Path | Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Draw the runs' curves into an image, atomically. Default: RUN_DIR/curves.png for one run,
    curves.png in the working directory for several."""
    dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    fig = plot_runs(dirs)
    default = Path(dirs[0]) / "curves.png" if len(dirs) == 1 else Path("curves.png")
    path = Path(out) if out is not None else default
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
