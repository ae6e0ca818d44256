"""Console progress, the metrics log and Weights & Biases: rank 0 only.

Every logged record goes to `metrics.jsonl` in the run directory (one JSON object a line, the
source of the loss curves) and, when enabled, to W&B. The console gets one line every
`log_every` steps with loss, tokens/s, MFU (on GPUs) and ETA.
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


class Tracker:
    """Metrics sink of one run. Create it on every rank; only rank 0 writes anything."""

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
        self.wandb: Any = None
        self.run_id: str | None = resume_id
        if is_main and cfg.wandb.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")  # no banners on the console
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity or None,
                name=cfg.wandb.name or run_dir.name,
                group=cfg.wandb.group or None,
                tags=cfg.wandb.tags or None,
                mode=cfg.wandb.mode,
                dir=str(run_dir),
                config=config,
                id=resume_id,
                resume="allow" if resume_id else None,
            )
            self.run_id = self.wandb.id
        self._t0 = time.perf_counter()
        self._steps_timed = 0

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append a record to metrics.jsonl and W&B."""
        if not self.is_main:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def throughput(self, tokens: int, seconds: float) -> dict[str, float]:
        """tokens/s and, on a GPU, model FLOPs utilisation for `tokens` trained in `seconds`."""
        rate = tokens / max(seconds, 1e-9)
        out = {"tokens_per_s": rate}
        if self.peak_flops:
            out["mfu"] = rate * self.flops_per_token / self.peak_flops
        return out

    def progress(self, step: int, metrics: dict[str, Any], step_seconds: float) -> None:
        """One console line: step, loss, lr, tokens/s, MFU, ETA."""
        if not self.is_main:
            return
        eta = format_duration((self.total_steps - step) * step_seconds)
        parts = [f"step {step}/{self.total_steps}", f"loss {metrics['loss']:.4f}"]
        parts.append(f"lr {metrics['lr']:.2e}")
        if metrics.get("grad_norm") is not None:
            parts.append(f"gnorm {metrics['grad_norm']:.2f}")
        parts.append(f"{metrics['tokens_per_s'] / 1e3:.1f}k tok/s")
        if "mfu" in metrics:
            parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
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
