"""Attention plumbing of the GPT: the KV cache, attention masks and the SDPA call.

Everything here is parameter-free, so the module tree (and checkpoint names) of the GPT in
`lmforge.model` does not depend on it.

Shapes: B batch, T query length, S key length (cache included), H query heads, K key/value
heads, E head size, L layers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from lmforge.positions import alibi_slopes

if TYPE_CHECKING:
    # Only for annotations: lmforge.model imports this module, so a runtime import would cycle.
    from lmforge.model import ModelConfig

AttentionKind = Literal["causal", "bidirectional", "prefix"]


# ------------------------------------------------------------------------------- the cache


class KVCache:
    """Preallocated keys and values for decoding: L tensors (B, K, S_max, E) each (one tensor per
    layer, so a compiled step mutates whole inputs, never views of a bigger one).

    Also keeps which cached positions are real tokens (left padding is not), so attention masks
    can be rebuilt for every step. One cache serves one batch of sequences. After the prompt,
    `make_static()` switches it to fixed shapes: each token is written at `index` (a device
    tensor the caller advances) and attention runs over all S_max slots, unwritten ones masked,
    so one compiled (CUDA-graph) decode step serves every position.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch, cfg.kv_heads, max_len, cfg.head_size)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len
        self.padded = False  # some written position is padding (known without a device sync)
        self.static = False
        self.index: torch.Tensor | None = None  # (1,) the next slot, once static

    def make_static(self, *, compiled: bool = False) -> None:
        """Decode with fixed shapes from here on (see the class doc). `compiled` marks the
        buffers as static addresses, which torch.compile's CUDA graphs need."""
        if self.index is None:
            self.index = torch.tensor([self.length], device=self.valid.device)
            if compiled:
                for t in (*self.k, *self.v, self.valid, self.index):
                    torch._dynamo.mark_static_address(t)
        else:
            self.index.fill_(self.length)
        self.static = True

    def reset(self) -> None:
        """Empty the cache for a new batch, keeping its buffers (and their addresses)."""
        self.valid.zero_()
        self.length, self.padded, self.static = 0, False, False

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, E) at the current length; return all cached (B, K, S, E)
        (static: write at `index`, return all S_max slots)."""
        if self.static:
            assert self.index is not None
            self.k[layer].index_copy_(2, self.index, k)
            self.v[layer].index_copy_(2, self.index, v)
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def load_rows(self, src: KVCache, rows: torch.Tensor) -> None:
        """Fill this empty cache with the written slots of `src`, row b taking src's row rows[b]
        (B,): a prompt that several rows share (a GRPO group) is run once and copied. Writes
        into the existing buffers, so a kept (compiled) cache keeps its addresses."""
        n = src.length
        for mine, theirs in ((self.k, src.k), (self.v, src.v)):
            for layer, t in enumerate(theirs):
                mine[layer][:, :, :n] = t[rows, :, :n]
        self.valid[:, :n] = src.valid[rows, :n]
        self.length, self.padded = n, src.padded

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop the rows where keep (B,) is False; the rest stay, in order (a row that stopped
        leaves a decode batch). Dynamic caches only: a static one keeps its shapes."""
        if self.static:
            raise RuntimeError("a static cache keeps its batch; drop rows before make_static")
        self.k = [t[keep] for t in self.k]
        self.v = [t[keep] for t in self.v]
        self.valid = self.valid[keep]

    def drop(self, start: int, keep: torch.Tensor) -> None:
        """Forget, in row b, the written slots from start + keep[b] on (keep (B,)): they become
        holes that attention skips (speculative decoding's rejected tokens). The length rolls
        back to start + max(keep), so slots no row kept are written again."""
        end = start + int(keep.max())
        slots = torch.arange(start, self.length, device=self.valid.device)  # (S',)
        hole = slots[None] >= (start + keep)[:, None]  # (B, S')
        self.valid[:, start : self.length] &= ~hole
        self.padded = self.padded or bool(hole[:, : end - start].any())
        self.length = end

    def compact(self) -> None:
        """Move each row's real tokens, in order, to the end of the first n slots (n: the most
        real tokens of a row), removing the holes between them; rows with fewer start with
        padding. Attention over the cache is unchanged (positions are not stored by slot)."""
        s = self.length
        slots = torch.arange(s, device=self.valid.device)
        valid = self.valid[:, :s]  # (B, S)
        # Holes sort first (-1), then the real slots in order; the last n are the row's tokens.
        order = torch.where(valid, slots[None], -1).sort(dim=1).values  # (B, S)
        n = int(valid.sum(1).max())
        src = order[:, s - n :]  # (B, n)
        index = src.clamp(min=0)[:, None, :, None]  # (B, 1, n, 1)
        index = index.expand(-1, self.k[0].shape[1], -1, self.k[0].shape[3])  # (B, K, n, E)
        for cached in (self.k, self.v):
            for layer, t in enumerate(cached):
                cached[layer][:, :, :n] = t[:, :, :s].gather(2, index)
        self.valid[:, :n] = src >= 0
        self.valid[:, n:] = False
        self.padded = bool((src < 0).any())
        self.length = n


# ----------------------------------------------------------------------------- attention mask


@dataclass
class AttentionMask:
    """What SDPA needs for one forward: a mask (bool, or float with ALiBi), or is_causal."""

    mask: torch.Tensor | None  # (B, 1 or H, T, S); bool True = may attend, or additive float
    is_causal: bool


def build_attention_mask(
    cfg: ModelConfig,
    kind: AttentionKind,
    *,
    batch: int,
    q_len: int,
    start: int,
    device: torch.device,
    dtype: torch.dtype,
    prefix_len: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
) -> AttentionMask:
    """Mask for T=q_len queries at sequence indices start.. against S=start+q_len keys.

    kind: causal (key index <= query index), bidirectional (all keys), or prefix (causal, plus
    every key before prefix_len (B,) of that sample). doc_ids (B, S) restrict attention to the
    same document (packed sequences); key_valid (B, S) hides padding. ALiBi adds -slope·distance.
    """
    s_len = start + q_len
    plain = doc_ids is None and key_valid is None and cfg.position != "alibi"
    if plain and kind == "bidirectional":
        return AttentionMask(None, False)
    if plain and kind == "causal":
        # SDPA's is_causal aligns top-left, so it is only right when queries and keys coincide.
        if start == 0:
            return AttentionMask(None, True)
        if q_len == 1:
            return AttentionMask(None, False)
    q_idx = torch.arange(start, s_len, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(s_len, device=device)[None, :]  # (1, S)
    allowed = torch.ones(batch, q_len, s_len, dtype=torch.bool, device=device)  # (B, T, S)
    if kind in ("causal", "prefix"):
        causal = k_idx <= q_idx  # (T, S)
        if kind == "prefix":
            if prefix_len is None:
                raise ValueError("attention 'prefix' needs prefix_len (B,)")
            in_prefix = k_idx[None] < prefix_len.to(device)[:, None, None]  # (B, 1, S)
            allowed = causal[None] | in_prefix
        else:
            allowed = allowed & causal[None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, start:s_len, None] == doc_ids[:, None, :s_len])
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :s_len]
    # A query may always see itself: padded queries would otherwise have no key and give NaN.
    allowed = allowed | (k_idx == q_idx)[None]
    if cfg.position != "alibi":
        return AttentionMask(allowed[:, None], False)  # (B, 1, T, S)
    distance = (q_idx - k_idx).abs().float()  # (T, S)
    slopes = alibi_slopes(cfg.n_heads).to(device)  # (H,)
    bias = -slopes[:, None, None] * distance[None]  # (H, T, S)
    bias = bias[None].expand(batch, -1, -1, -1)  # (B, H, T, S)
    bias = bias.masked_fill(~allowed[:, None], float("-inf"))
    return AttentionMask(bias.to(dtype), False)


def static_decode_mask(cfg: ModelConfig, cache: KVCache, dtype: torch.dtype) -> AttentionMask:
    """Mask of one query at slot cache.index against all S_max slots of a static cache: the
    written real tokens (later slots are unwritten, so causality holds), ALiBi biases by
    distance. Shapes do not depend on the position."""
    assert cache.index is not None
    allowed = cache.valid[:, None, None, :]  # (B, 1, 1, S)
    if cfg.position != "alibi":
        return AttentionMask(allowed, False)
    k_idx = torch.arange(cache.max_len, device=cache.valid.device)  # (S,)
    distance = (cache.index[:, None] - k_idx[None]).abs().float()  # (1, S)
    slopes = alibi_slopes(cfg.n_heads).to(cache.valid.device)  # (H,)
    bias = -slopes[:, None, None] * distance[None]  # (H, 1, S)
    bias = bias[None].expand(cache.valid.shape[0], -1, -1, -1)  # (B, H, 1, S)
    return AttentionMask(bias.masked_fill(~allowed, float("-inf")).to(dtype), False)


def track_key_validity(
    cache: KVCache | None, attention_mask: torch.Tensor | None, start: int, q_len: int
) -> torch.Tensor | None:
    """Record in `cache` which of the q_len new keys at start.. are real tokens; return the
    (B, S) flags of the keys to mask, or None when every key is real (no mask needed).

    attention_mask (B, T): the new tokens' flags (1 real, 0 padding), None when all are real.
    """
    if cache is not None and cache.static:
        assert cache.index is not None
        cache.valid.index_fill_(1, cache.index, True)
        return None
    if cache is not None:
        if attention_mask is None:  # new tokens are real: nothing to check on the device
            cache.valid[:, start : start + q_len] = True
        else:
            cache.valid[:, start : start + q_len] = attention_mask.bool()
            cache.padded = cache.padded or not bool(attention_mask.all())
        return cache.valid if cache.padded else None
    if attention_mask is not None and not bool(attention_mask.all()):
        return attention_mask.bool()
    return None


# ------------------------------------------------------------------------------ the kernel


# Whether a masked GQA call repeats the key/value heads itself, per device type. On CUDA, SDPA's
# flash kernel (GQA, no mask) and memory-efficient kernel (masks, no GQA) each miss one of the
# two, so masked GQA would fall back to the math kernel, which holds (B, H, T, S) scores.
EXPAND_MASKED_KV: dict[str, bool] = defaultdict(bool, cuda=True)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    dropout: float,
    *,
    expand_kv: bool = False,
) -> torch.Tensor:
    """SDPA of q (B, H, T, E) over k, v (B, K, S, E) -> (B, H, T, E). Unmasked calls pass the K
    heads as they are (enable_gqa: flash attention takes them); with expand_kv a masked call
    gets them repeated to H heads first (the same values: enable_gqa is defined that way)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and expand_kv and mask.mask is not None:
        k, v = (
            k.repeat_interleave(groups, dim=1),
            v.repeat_interleave(groups, dim=1),
        )  # (B, H, S, E)
        groups = 1
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask.mask,
        is_causal=mask.is_causal,
        dropout_p=dropout,
        enable_gqa=groups > 1,
    )
