"""Parameter groups and learning-rate schedules (pure PyTorch; the engine builds the optimizer)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lmforge.config import option
from lmforge.errors import ConfigError

Schedule = Literal["cosine", "linear", "constant", "wsd", "inverse_sqrt"]


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = option(3e-4, "Peak learning rate.")
    min_lr_ratio: float = option(
        0.1, "Final learning rate as a fraction of lr (cosine, linear, wsd)."
    )
    weight_decay: float = option(
        0.1, "Decoupled weight decay on matrices (not norms, biases, embeddings)."
    )
    betas: tuple[float, float] = option((0.9, 0.95), "Adam beta1, beta2.")
    eps: float = option(1e-8, "Adam epsilon.")
    grad_clip: float = option(1.0, "Clip the global gradient norm to this; 0 = no clipping.")
    schedule: Schedule = option("cosine", "cosine | linear | constant | wsd | inverse_sqrt.")
    warmup_steps: int = option(100, "Linear warmup from 0 to lr over this many optimizer steps.")
    decay_fraction: float = option(0.2, "wsd: fraction of the steps spent in the final decay.")

    def validate(self, prefix: str = "optim") -> None:
        """Reject values outside their range, naming the key."""
        p = f"{prefix}." if prefix else ""
        if self.lr <= 0:
            raise ConfigError(f"{p}lr: must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{p}min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ConfigError(f"{p}weight_decay, grad_clip and warmup_steps must be >= 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{p}betas: each must be in [0, 1), got {list(self.betas)}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"{p}decay_fraction: must be in (0, 1], got {self.decay_fraction}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay for weight matrices; none for norms, biases and embeddings (a tied
    output matrix is the embedding, so it is not decayed either). Frozen parameters and empty
    groups are left out."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a shared (tied) tensor once
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]  # LoRA leaves no trainable norm: no empty group


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based) of `total_steps`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "inverse_sqrt":  # Vaswani et al. 2017, continuous at the end of warmup
        return math.sqrt(max(cfg.warmup_steps, 1) / (step + 1))
    floor = cfg.min_lr_ratio
    if cfg.schedule == "wsd":  # warmup-stable-decay (Hu et al. 2024): flat, then linear decay
        decay_start = total_steps - max(1, round(cfg.decay_fraction * total_steps))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, total_steps - decay_start)
        return 1.0 - (1.0 - floor) * min(1.0, progress)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying `lr_factor`; stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, total_steps)
    )
