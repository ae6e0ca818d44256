"""Pretraining objectives: each turns a packed batch into the model's inputs and labels.

A packed batch holds `input_ids` and `labels` (B, T) — labels are the inputs shifted left by one —
and, with document masking, `doc_ids` and `position_ids` (B, T). Every objective returns the
keyword arguments of `GPT.forward`: labels are aligned with positions (the output at position i
is scored against labels[i]); -100 marks positions without a loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmforge.config import option
from lmforge.errors import ConfigError
from lmforge.loss import IGNORE_INDEX

OBJECTIVES = ("causal", "mlm", "prefix")


@dataclass
class ObjectiveConfig:
    """Which objectives to train and how they corrupt their inputs."""

    mix: dict[str, float] = option(
        default_factory=lambda: {"causal": 1.0},
        doc="Objective weights by batch, e.g. {causal: 0.5, mlm: 0.5}; keys: causal, mlm, prefix.",
    )
    mask_rate: float = option(0.15, "mlm: fraction of tokens selected for prediction (BERT).")
    mask_token_fraction: float = option(0.8, "mlm: of the selected, share replaced by <|mask|>.")
    random_token_fraction: float = option(0.1, "mlm: of the selected, share replaced at random.")
    prefix_min: float = option(0.1, "prefix: shortest prefix as a fraction of the sequence.")
    prefix_max: float = option(0.9, "prefix: longest prefix as a fraction of the sequence.")

    def validate(self, prefix: str = "objective") -> None:
        """Reject unknown objectives and rates outside [0, 1], naming the key."""
        p = f"{prefix}." if prefix else ""
        for name, weight in self.mix.items():
            if name not in OBJECTIVES:
                raise ConfigError(f"{p}mix.{name}: unknown objective; choose from {OBJECTIVES}")
            if weight < 0:
                raise ConfigError(f"{p}mix.{name}: weight must be >= 0, got {weight}")
        if not self.mix or sum(self.mix.values()) <= 0:
            raise ConfigError(f"{p}mix: give at least one objective a positive weight")
        if not 0.0 < self.mask_rate < 1.0:
            raise ConfigError(f"{p}mask_rate: must be in (0, 1), got {self.mask_rate}")
        if self.mask_token_fraction + self.random_token_fraction > 1.0:
            raise ConfigError(f"{p}mask_token_fraction + random_token_fraction must be <= 1")
        if not 0.0 < self.prefix_min <= self.prefix_max < 1.0:
            raise ConfigError(f"{p}prefix_min/prefix_max: need 0 < min <= max < 1")

    @property
    def active(self) -> list[str]:
        """Objectives with positive weight, in a fixed order."""
        return [name for name in OBJECTIVES if self.mix.get(name, 0.0) > 0]


def choose_objective(cfg: ObjectiveConfig, step: int, seed: int) -> str:
    """The objective of global step `step`: a draw by weight, the same on every rank."""
    names = cfg.active
    if len(names) == 1:
        return names[0]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    weights = torch.tensor([cfg.mix[n] for n in names], dtype=torch.float64)
    return names[int(torch.multinomial(weights, 1, generator=gen))]


def sample_generators(seed: int, positions: list[int]) -> list[torch.Generator]:
    """One generator per sample, seeded by its position in the global sample stream, so that a
    sample is corrupted the same way whatever the number of processes or micro-batch size."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + p) for p in positions]


def _rand(generators: list[torch.Generator], t: int) -> torch.Tensor:
    return torch.stack([torch.rand(t, generator=g) for g in generators])  # (B, T)


def _passthrough(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {k: batch[k] for k in ("doc_ids", "position_ids") if k in batch}


def causal_lm(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Next-token prediction with causal attention."""
    return {"input_ids": batch["input_ids"], "labels": batch["labels"], **_passthrough(batch)}


def masked_next_token(
    batch: dict[str, torch.Tensor],
    cfg: ObjectiveConfig,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: torch.Tensor,
    generators: list[torch.Generator],
) -> dict[str, Any]:
    """Masked next-token prediction (GPT-BERT, Charpentier & Samuel 2024).

    Tokens at positions 1..T-1 are selected with probability mask_rate (special tokens never);
    a selected token is replaced by <|mask|> (80%), a random token (10%) or kept (10%). Attention
    is bidirectional, and the output at position i-1 predicts the original token at position i,
    so the loss counts selected tokens only.
    """
    ids = batch["input_ids"]
    t = ids.shape[1]
    draw = _rand(generators, t)  # (B, T)
    selected = (draw < cfg.mask_rate) & ~torch.isin(ids, special_ids)
    selected[:, 0] = False  # position 0 has no predecessor to predict it
    how = _rand(generators, t)  # (B, T): which corruption
    to_mask = selected & (how < cfg.mask_token_fraction)
    to_random = (
        selected
        & (how >= cfg.mask_token_fraction)
        & (how < cfg.mask_token_fraction + cfg.random_token_fraction)
    )
    corrupted = ids.masked_fill(to_mask, mask_id)
    random_ids = (_rand(generators, t) * vocab_size).long().clamp(max=vocab_size - 1)  # (B, T)
    corrupted = torch.where(to_random, random_ids, corrupted)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(selected[:, 1:], ids[:, 1:], IGNORE_INDEX)  # (B, T-1) shifted
    return {
        "input_ids": corrupted,
        "labels": labels,
        "attention": "bidirectional",
        **_passthrough(batch),
    }


def prefix_lm(
    batch: dict[str, torch.Tensor], cfg: ObjectiveConfig, *, generators: list[torch.Generator]
) -> dict[str, Any]:
    """Prefix LM (Raffel et al. 2020): bidirectional over a random prefix, causal after it; the
    loss covers only tokens after the prefix (those the prefix cannot see)."""
    ids = batch["input_ids"]
    t = ids.shape[1]
    low, high = max(1, int(cfg.prefix_min * t)), max(1, int(cfg.prefix_max * t))
    prefix_len = torch.cat(
        [torch.randint(low, high + 1, (1,), generator=g) for g in generators]
    )  # (B,)
    labels = batch["labels"].clone()
    # Position i predicts token i+1, which it can see if i+1 < prefix_len: no loss there.
    hidden = torch.arange(t)[None, :] < (prefix_len[:, None] - 1)  # (B, T)
    labels[hidden] = IGNORE_INDEX
    return {
        "input_ids": ids,
        "labels": labels,
        "attention": "prefix",
        "prefix_len": prefix_len,
        **_passthrough(batch),
    }


def apply_objective(
    name: str,
    batch: dict[str, torch.Tensor],
    cfg: ObjectiveConfig,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: torch.Tensor,
    generators: list[torch.Generator],
) -> dict[str, Any]:
    """Inputs for `name` (causal, mlm or prefix) built from a packed batch on the CPU, with one
    random generator per sample (see `sample_generators`)."""
    if name == "causal":
        return causal_lm(batch)
    if name == "mlm":
        return masked_next_token(
            batch,
            cfg,
            mask_id=mask_id,
            vocab_size=vocab_size,
            special_ids=special_ids,
            generators=generators,
        )
    if name == "prefix":
        return prefix_lm(batch, cfg, generators=generators)
    raise ConfigError(f"objective.mix.{name}: unknown objective; choose from {OBJECTIVES}")
