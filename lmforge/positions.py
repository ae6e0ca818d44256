"""Position encodings of the GPT: rotary tables (RoPE), ALiBi slopes and the sinusoidal table.

Pure tensor functions, no modules or parameters, so `lmforge.model` and the attention masks can
share them. Shapes: B batch, T positions, E head size, D model width, H heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from lmforge.errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """How the rotary frequencies are rescaled to reach past the pretraining context.

    kind: "linear" position interpolation (Chen et al. 2023, "Extending Context Window of Large
    Language Models via Positional Interpolation"): every frequency divided by `factor`;
    "dynamic" NTK-aware scaling (bloc97 and emozilla 2023, described in Peng et al. 2023, YaRN,
    sec. 3.3): the base grows with the sequence length once it exceeds `original_max_len`;
    "llama3": Llama 3.1's (Meta 2024, "The Llama 3 Herd of Models"): long wavelengths divided
    by `factor`, short ones kept, a smooth ramp between `low_freq_factor` and `high_freq_factor`.
    """

    kind: Literal["linear", "dynamic", "llama3"]
    factor: float
    original_max_len: int
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def validate(self, head_size: int, prefix: str = "model.") -> None:
        """Reject values the frequencies cannot be computed with, naming the ModelConfig key."""
        if self.factor <= 0:
            raise ConfigError(f"{prefix}rope_factor: must be positive, got {self.factor}")
        if self.original_max_len <= 0:
            raise ConfigError(f"{prefix}rope_original_max_seq_len: must be positive or null")
        if self.kind == "dynamic" and head_size <= 2:  # the exponent E / (E - 2)
            raise ConfigError(f"{prefix}head_dim: dynamic rope needs a head size above 2")
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"{prefix}rope_high_freq_factor: must exceed rope_low_freq_factor (llama3)"
            )


def rope_inv_freq(
    head_size: int,
    theta: float,
    scaling: RopeScaling | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Inverse frequencies (E/2,) of the rotary pairs, with a static scaling (linear, llama3)
    applied; dynamic scaling depends on the positions and is applied in `rope_cos_sin`."""
    exponents = torch.arange(0, head_size, 2, device=device, dtype=torch.int64).float()
    inv_freq = 1.0 / (theta ** (exponents / head_size))  # (E/2,)
    if scaling is None or scaling.kind == "dynamic":
        return inv_freq
    if scaling.kind == "linear":
        # Dividing the frequencies is dividing the positions: position p is read as p / factor.
        return inv_freq / scaling.factor
    return _llama3_inv_freq(inv_freq, scaling)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's rescaling: a pair whose wavelength (in tokens) is longer than
    original/low_freq_factor never completed a turn in pretraining, so it is interpolated
    (divided by factor); one shorter than original/high_freq_factor turned many times and is
    kept; in between, a linear blend in original/wavelength keeps the spectrum continuous."""
    wavelength = 2 * math.pi / inv_freq  # (E/2,)
    long_wave = s.original_max_len / s.low_freq_factor
    short_wave = s.original_max_len / s.high_freq_factor
    # 0 at the long-wave boundary, 1 at the short-wave one.
    ramp = (s.original_max_len / wavelength - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - ramp) * inv_freq / s.factor + ramp * inv_freq
    scaled = torch.where(wavelength > long_wave, inv_freq / s.factor, inv_freq)
    between = (wavelength >= short_wave) & (wavelength <= long_wave)
    return torch.where(between, blended, scaled)


def _dynamic_ntk_inv_freq(
    positions: torch.Tensor, head_size: int, theta: float, s: RopeScaling
) -> torch.Tensor:
    """Inverse frequencies (E/2,) of dynamic NTK scaling for a batch at positions (B, T).

    The base becomes theta · (factor·L/L0 − (factor − 1))^(E/(E−2)), L the batch's length
    (largest position + 1, at least L0 = original_max_len): unchanged up to L0, then growing
    so that the lowest frequency stretches over L. As in transformers, one length serves the
    whole batch. Computed on the device (no host sync), so a compiled decode step keeps it.
    """
    plain = rope_inv_freq(head_size, theta, device=positions.device)  # (E/2,)
    length = (positions.max() + 1).clamp(min=s.original_max_len)  # () int64
    stretch = s.factor * length / s.original_max_len - (s.factor - 1)  # () float32
    base = theta * stretch ** (head_size / (head_size - 2))
    exponents = torch.arange(0, head_size, 2, device=positions.device, dtype=torch.int64).float()
    scaled = 1.0 / (base ** (exponents / head_size))  # (E/2,)
    # Within the original context the plain frequencies are used as they are (bit for bit).
    return torch.where(length > s.original_max_len, scaled, plain)


def rope_cos_sin(
    positions: torch.Tensor,
    head_size: int,
    theta: float,
    dtype: torch.dtype,
    scaling: RopeScaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (B, T, E) for rotary embeddings at the given positions (B, T), with
    the frequencies rescaled by `scaling` when given."""
    if scaling is not None and scaling.kind == "dynamic":
        inv_freq = _dynamic_ntk_inv_freq(positions, head_size, theta, scaling)  # (E/2,)
    else:
        inv_freq = rope_inv_freq(head_size, theta, scaling, positions.device)  # (E/2,)
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
