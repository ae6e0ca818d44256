"""Shared fixtures: small model configs, determinism, CPU-only defaults."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from lmforge.model import ModelConfig

torch.set_num_threads(min(2, torch.get_num_threads()))


def small_config(**overrides: object) -> ModelConfig:
    """A model small enough to train in a fraction of a second on CPU."""
    base: dict[str, object] = dict(
        vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64
    )
    base.update(overrides)
    cfg = ModelConfig(**base)  # type: ignore[arg-type]
    cfg.validate("model")
    return cfg


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
