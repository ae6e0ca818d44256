"""Position encodings of the GPT: rotary tables (RoPE), ALiBi slopes and the sinusoidal table.

Pure tensor functions, no modules or parameters, so `lmforge.model` and the attention masks can
share them. Shapes: B batch, T positions, E head size, D model width, H heads.
"""

from __future__ import annotations

import math

import torch


def rope_cos_sin(
    positions: torch.Tensor, head_size: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (B, T, E) for rotary embeddings at the given positions (B, T)."""
    exponents = torch.arange(0, head_size, 2, device=positions.device, dtype=torch.int64).float()
    inv_freq = 1.0 / (theta ** (exponents / head_size))  # (E/2,)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, E/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, E): the half-rotation layout of HF Llama
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, E) by the position tables (B, T, E)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, E): broadcast over heads
    return x * cos + _rotate_half(x) * sin


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al. 2022): a geometric series, interleaved when the head
    count is not a power of two, as in the paper's reference code."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(closest)
    if closest != n_heads:
        slopes += power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes)


def sinusoidal_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin/cos position embeddings (Vaswani et al. 2017) for positions (B, T) -> (B, T, D)."""
    i = torch.arange(0, dim, 2, device=positions.device).float()
    angles = positions.float()[..., None] / (10000.0 ** (i / dim))  # (B, T, D/2)
    table = torch.stack((angles.sin(), angles.cos()), dim=-1)  # (B, T, D/2, 2)
    return table.flatten(-2)  # (B, T, D): sin at even, cos at odd channels
