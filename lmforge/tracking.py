"""Console progress, the metrics log and Weights & Biases: rank 0 only.

Every logged record goes to `metrics.jsonl` in the run directory (one JSON object a line, the
source of the loss curves and of `lmforge plot`) and, when enabled, to W&B. The console gets
one line every `log_every` steps with step/total, loss, lr, gradient norm, for GRPO and PPO the
reward, KL, response length and generation share, tokens/s, MFU (on GPUs), memory and ETA.
The W&B API key is never read here: wandb finds it itself (WANDB_API_KEY or `wandb login`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.config import option
from lmforge.errors import ConfigError


@dataclass
class WandbConfig:
    """Weights & Biases run settings."""

    mode: Literal["disabled", "offline", "online"] = option(
        "disabled", "disabled | offline (files only, sync later) | online."
    )
    project: str = option("lmforge", "W&B project.")
    entity: str = option("", "W&B entity (team or user); empty = your default.")
    name: str = option("", "Run name; empty = the run directory's name.")
    group: str = option("", "Run group, e.g. an experiment sweep.")
    tags: list[str] = option(default_factory=list, doc="Run tags.")


@dataclass
class TrackingConfig:
    """Logging cadence and destinations."""

    log_every: int = option(10, "Print and log training metrics every this many steps.")
    wandb: WandbConfig = option(default_factory=WandbConfig, doc="Weights & Biases.")


def measure_peak_flops(device: torch.device) -> float | None:
    """bf16 matmul FLOP/s measured on this GPU (the ceiling MFU is quoted against); None on CPU."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def format_duration(seconds: float) -> str:
    """1h02m, 3m05s or 12s."""
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def memory_metrics() -> dict[str, float]:
    """Memory of this process in GiB: peak allocated CUDA memory on a GPU, else resident RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"memory/gpu_peak_gb": torch.cuda.max_memory_allocated() / 2**30}
    try:
        import psutil

        return {"memory/rss_gb": psutil.Process().memory_info().rss / 2**30}
    except ImportError:  # pragma: no cover - psutil comes with deepspeed
        import resource

        return {"memory/rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _scrub(text: str) -> str:
    """`text` without the W&B API key, should a library message quote it."""
    key = os.environ.get("WANDB_API_KEY", "")
    return text.replace(key, "***") if len(key) >= 8 else text


class Tracker:
    """Metrics sink of one run. Create it on every rank; only rank 0 writes anything.

    With W&B on, the run is created with the resolved config, every `log` record goes to it,
    and each evaluation's generations (the rows `log_samples` gets, and the rows a stage appended
    to `run_dir/samples.jsonl` since the last evaluation) become a `samples` table. `run_id`
    goes into checkpoint metadata; a resumed run passes it back as `resume_id` and continues
    the same W&B run.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: TrackingConfig,
        *,
        is_main: bool,
        config: dict[str, Any],
        total_steps: int,
        flops_per_token: float,
        peak_flops: float | None,
        resume_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.is_main = is_main
        self.total_steps = total_steps
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.wandb: Any = None
        self.run_id: str | None = resume_id
        self.step = 0  # the last step logged
        self._anchor: tuple[int, float] | None = None  # (step, time) of the first progress line
        # Rows already in samples.jsonl (a resumed run) were logged by the earlier job.
        self._samples_seen = self.samples_path.stat().st_size if self.samples_path.exists() else 0
        if is_main and cfg.wandb.mode != "disabled":
            self._start_wandb(run_dir, config, resume_id)

    def _start_wandb(self, run_dir: Path, config: dict[str, Any], resume_id: str | None) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")  # no banners on the console
        import wandb

        w = self.cfg.wandb
        try:
            self.wandb = wandb.init(
                project=w.project,
                entity=w.entity or None,
                name=w.name or run_dir.name,
                group=w.group or None,
                tags=w.tags or None,
                mode=w.mode,
                dir=str(run_dir),
                config=config,
                id=resume_id,
                resume="allow" if resume_id else None,
            )
        except (wandb.errors.Error, OSError) as e:
            first = _scrub(str(e)).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"tracking.wandb.mode={w.mode}: W&B did not start ({first}); run `wandb login` "
                "or set WANDB_API_KEY, or use tracking.wandb.mode=offline"
            ) from None
        self.run_id = self.wandb.id

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append a record to metrics.jsonl and W&B; an evaluation record (eval/* keys) also
        sends the generations the stage appended to samples.jsonl as a W&B table."""
        if not self.is_main:
            return
        self.step = step
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=step)
            if any(k.startswith("eval") for k in metrics):
                self.log_samples(self._new_sample_rows(), step=step)

    def _new_sample_rows(self) -> list[dict[str, Any]]:
        """Complete rows appended to samples.jsonl since the last call."""
        if not self.samples_path.exists():
            return []
        with open(self.samples_path, "rb") as f:
            f.seek(self._samples_seen)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self._samples_seen += end
        rows = []
        for line in data[:end].decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def log_samples(self, rows: list[dict[str, Any]], step: int | None = None) -> None:
        """Generations of one evaluation (dicts such as prompt/completion/answer) as the W&B
        table `samples` at `step` (default: the last logged step)."""
        if not self.is_main or self.wandb is None or not rows:
            return
        import wandb

        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        data = [[_table_value(row.get(c)) for c in columns] for row in rows]
        table = wandb.Table(columns=columns, data=data)
        self.wandb.log({"samples": table}, step=self.step if step is None else step)

    def throughput(self, tokens: int, seconds: float) -> dict[str, float]:
        """tokens/s, model FLOPs utilisation on a GPU (when the peak is known) and memory, for
        `tokens` trained in `seconds`."""
        rate = tokens / max(seconds, 1e-9)
        out = {"tokens_per_s": rate}
        if self.peak_flops and self.flops_per_token:
            out["mfu"] = rate * self.flops_per_token / self.peak_flops
        out.update(memory_metrics())
        return out

    def progress(self, step: int, metrics: dict[str, Any], step_seconds: float) -> None:
        """One console line: step/total and percent, loss, lr, grad norm, the RL stages' reward,
        KL, response length and generation share (`rl_parts`), tokens/s, MFU, memory and ETA
        (from the wall time since the first line, evaluations included)."""
        if not self.is_main:
            return
        now = time.perf_counter()
        if self._anchor is None or step <= self._anchor[0]:
            self._anchor = (step, now)
            per_step = step_seconds
        else:
            per_step = (now - self._anchor[1]) / (step - self._anchor[0])
        eta = format_duration(max(self.total_steps - step, 0) * per_step)
        percent = 100 * step / max(self.total_steps, 1)
        parts = [f"step {step}/{self.total_steps} ({percent:.0f}%)"]
        if metrics.get("loss") is not None:
            parts.append(f"loss {metrics['loss']:.4f}")
        if metrics.get("lr") is not None:
            parts.append(f"lr {metrics['lr']:.2e}")
        if metrics.get("grad_norm") is not None:
            parts.append(f"gnorm {metrics['grad_norm']:.2f}")
        parts += rl_parts(metrics)
        if metrics.get("tokens_per_s") is not None:
            parts.append(f"{metrics['tokens_per_s'] / 1e3:.1f}k tok/s")
        if "mfu" in metrics:
            parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
        memory = metrics.get("memory/gpu_peak_gb", metrics.get("memory/rss_gb"))
        if memory is not None:
            parts.append(f"mem {memory:.2f}G")
        parts.append(f"ETA {eta}")
        print(" | ".join(parts), flush=True)

    def message(self, text: str) -> None:
        """A line for the person watching (rank 0 only)."""
        if self.is_main:
            print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        """Finish the W&B run."""
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


# What an RL step reports, as (metric, console label, format): the rollout's mean reward, the
# policy's KL to the reference, the mean response length in tokens and the share of the step
# spent generating (the part a faster sampler would save).
RL_FIELDS = (
    ("reward", "reward", "{:.3f}"),
    ("kl", "KL", "{:.4f}"),
    ("response_length", "len", "{:.1f}"),
    ("time/generation_share", "gen", "{:.0%}"),
)


def rl_parts(metrics: dict[str, Any]) -> list[str]:
    """The progress line's RL fields present in `metrics` ('reward 0.625', 'gen 41%')."""
    return [
        f"{label} {fmt.format(metrics[key])}"
        for key, label, fmt in RL_FIELDS
        if isinstance(metrics.get(key), (int, float)) and math.isfinite(metrics[key])
    ]


def _table_value(value: Any) -> Any:
    """A W&B table cell: scalars as they are, anything else as JSON text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value)
