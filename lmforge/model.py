"""The GPT: a decoder-only transformer with every classic variant as a config value.

Plain single-device PyTorch (DESIGN rule 1): no deepspeed, no torch.distributed. Parameter names
follow Llama (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1/w2/w3`, `attention_norm`,
`ffn_norm`, `norm`, `output`) so that mapping to Hugging Face is a table in `checkpoint.py`.

Shapes: B batch, T query length, S key length (cache included), D model width, H query heads,
K key/value heads, E head size, V vocabulary, F feed-forward width.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# The cache, masks and position encodings live in their own modules; the names are re-exported
# here (`import X as X`) because callers import them from lmforge.model.
from lmforge.attention import EXPAND_MASKED_KV as EXPAND_MASKED_KV
from lmforge.attention import AttentionKind as AttentionKind
from lmforge.attention import AttentionMask as AttentionMask
from lmforge.attention import KVCache as KVCache
from lmforge.attention import attend as attend
from lmforge.attention import build_attention_mask as build_attention_mask
from lmforge.attention import static_decode_mask as static_decode_mask
from lmforge.attention import track_key_validity
from lmforge.config import option
from lmforge.errors import ConfigError
from lmforge.loss import LossConfig, linear_cross_entropy
from lmforge.positions import RopeScaling
from lmforge.positions import alibi_slopes as alibi_slopes
from lmforge.positions import apply_rope as apply_rope
from lmforge.positions import rope_cos_sin as rope_cos_sin
from lmforge.positions import sinusoidal_table as sinusoidal_table

# Linear biases (wq/wk/wv, wo, w1/w2/w3) that transformers' Qwen2 and Mistral hard-code.
FAMILY_BIASES = {"qwen2": (True, False, False), "mistral": (False, False, False)}
# (norm, norm_position, position, mlp) of every Llama-style family.
LLAMA_PARTS = ("rmsnorm", "pre", "rope", "swiglu")


@dataclass
class ModelConfig:
    """Architecture of the GPT. The defaults are a GPT-2-size Llama-style model."""

    PRESETS: ClassVar[str] = "model"

    vocab_size: int = option(50304, "Vocabulary size (rows of the embedding and output matrices).")
    dim: int = option(768, "Model width: size of the residual stream.")
    n_layers: int = option(12, "Number of transformer blocks.")
    n_heads: int = option(12, "Number of query heads.")
    n_kv_heads: int | None = option(
        4, "Key/value heads: n_heads = MHA, 1 = MQA, a divisor of n_heads = GQA; null = n_heads."
    )
    head_dim: int | None = option(None, "Size of one attention head; null = dim / n_heads.")
    ffn_dim: int | None = option(
        None, "Feed-forward width; null = 8/3·dim rounded up to 64 (swiglu) or 4·dim (gelu)."
    )
    max_seq_len: int = option(1024, "Longest sequence the model accepts (position limit).")
    norm: Literal["rmsnorm", "layernorm"] = option("rmsnorm", "Normalisation layer.")
    norm_eps: float = option(1e-5, "Epsilon added to the variance in every norm.")
    norm_position: Literal["pre", "post"] = option(
        "pre", "pre: norm before each sub-layer (GPT-2/Llama); post: after the residual add."
    )
    position: Literal["rope", "alibi", "learned", "sinusoidal", "none"] = option(
        "rope", "Position encoding: rotary, ALiBi biases, learned or sinusoidal table, or none."
    )
    rope_theta: float = option(10000.0, "RoPE base frequency (Su et al. 2021).")
    rope_type: Literal["default", "linear", "dynamic", "llama3"] = option(
        "default", "RoPE scaling: none, linear, dynamic NTK or Llama 3.1's (see positions.py)."
    )
    rope_factor: float = option(1.0, "Context multiplier of rope_type (ignored by default).")
    rope_low_freq_factor: float = option(
        1.0, "llama3: wavelengths above original/this are divided by rope_factor (Llama 3.1: 1)."
    )
    rope_high_freq_factor: float = option(
        4.0, "llama3: wavelengths below original/this are kept as they are (Llama 3.1: 4)."
    )
    rope_original_max_seq_len: int | None = option(
        None, "Pretraining context that llama3 and dynamic scale from; null = max_seq_len."
    )
    mlp: Literal["swiglu", "gelu"] = option(
        "swiglu", "Feed-forward: SwiGLU (Shazeer 2020) or GELU."
    )
    bias: bool = option(False, "Biases in every linear layer (and LayerNorm).")
    attention_bias: bool | None = option(
        None, "Biases on wq, wk, wv and wo (HF attention_bias); null = the family's, else bias."
    )
    qkv_bias: bool | None = option(
        None, "Biases on wq, wk, wv alone; null = attention_bias if set, else the family's layout."
    )
    mlp_bias: bool | None = option(
        None, "Biases on w1, w2, w3 (HF mlp_bias); null = the family's, else bias."
    )
    family: Literal["llama", "qwen2", "mistral"] = option(
        "llama", "HF model_type of a Llama-style model; qwen2 and mistral fix the biases too."
    )
    embed_dropout: float = option(0.0, "Dropout on the summed input embeddings.")
    attn_dropout: float = option(0.0, "Dropout on the attention probabilities.")
    resid_dropout: float = option(
        0.0, "Dropout on each sub-layer's output before the residual add."
    )
    tie_embeddings: bool = option(True, "Share the input embedding with the output projection.")
    init_std: float = option(0.02, "Standard deviation of the normal initialisation.")
    scaled_residual_init: bool = option(
        True, "GPT-2 init: residual output projections get init_std / sqrt(2·n_layers)."
    )

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads after resolving null."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        """Size of one attention head after resolving null."""
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Feed-forward width after resolving null."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        if self.mlp == "gelu":
            return 4 * self.dim
        return 64 * math.ceil(8 * self.dim / 3 / 64)

    def linear_biases(self) -> tuple[bool, bool, bool]:
        """Whether (wq/wk/wv, wo, w1/w2/w3) have biases, after resolving nulls: Qwen2 biases
        q/k/v only, Mistral nothing, Llama per attention_bias / mlp_bias, else `bias`."""
        fixed = FAMILY_BIASES.get(self.family)
        out = self.attention_bias if self.attention_bias is not None else self.bias
        mlp = self.mlp_bias if self.mlp_bias is not None else self.bias
        qkv = self.qkv_bias if self.qkv_bias is not None else out
        if fixed is not None:  # the family's layout wherever a flag is null
            out = fixed[1] if self.attention_bias is None else out
            mlp = fixed[2] if self.mlp_bias is None else mlp
            qkv = fixed[0] if self.qkv_bias is None and self.attention_bias is None else qkv
        return qkv, out, mlp

    @property
    def llama_style(self) -> bool:
        """RMSNorm, pre-norm, RoPE and SwiGLU: the parts of Llama, Qwen2 and Mistral."""
        return (self.norm, self.norm_position, self.position, self.mlp) == LLAMA_PARTS

    def rope_scaling(self) -> RopeScaling | None:
        """The RoPE frequency scaling, None for plain RoPE."""
        if self.rope_type == "default":
            return None
        original = self.rope_original_max_seq_len or self.max_seq_len
        low, high = self.rope_low_freq_factor, self.rope_high_freq_factor
        return RopeScaling(self.rope_type, self.rope_factor, original, low, high)

    def resolved(self) -> ModelConfig:
        """A copy with every null (n_kv_heads, head_dim, ffn_dim, the bias flags,
        rope_original_max_seq_len) replaced by its value."""
        qkv, out, mlp = self.linear_biases()
        return dataclasses.replace(
            self,
            n_kv_heads=self.kv_heads,
            head_dim=self.head_size,
            ffn_dim=self.hidden_dim,
            attention_bias=out,
            qkv_bias=qkv,
            mlp_bias=mlp,
            rope_original_max_seq_len=self.rope_original_max_seq_len or self.max_seq_len,
        )

    def validate(self, prefix: str = "model") -> None:
        """Reject shapes that cannot build a model, naming the key."""
        p = f"{prefix}." if prefix else ""
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{p}{key}: must be positive, got {getattr(self, key)}")
        for key in ("n_kv_heads", "head_dim", "ffn_dim"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{p}{key}: must be positive or null, got {value}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError(
                f"{p}n_heads: {self.n_heads} does not divide {p}dim={self.dim}; "
                "choose a divisor or set head_dim"
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"{p}n_kv_heads: {self.kv_heads} does not divide {p}n_heads={self.n_heads}"
            )
        if self.position == "rope" and self.head_size % 2:
            raise ConfigError(f"{p}head_dim: rope needs an even head size, got {self.head_size}")
        if self.position == "sinusoidal" and self.dim % 2:
            raise ConfigError(f"{p}dim: sinusoidal positions need an even width, got {self.dim}")
        for key in ("embed_dropout", "attn_dropout", "resid_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{p}{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_theta <= 0:
            raise ConfigError(f"{p}norm_eps, init_std and rope_theta must be positive")
        scaling = self.rope_scaling()
        if scaling is not None and self.position != "rope":
            raise ConfigError(f"{p}rope_type: {self.rope_type!r} needs position: rope")
        if scaling is not None:
            scaling.validate(self.head_size, p)
        self._validate_family(p)

    def _validate_family(self, p: str) -> None:
        layout = FAMILY_BIASES.get(self.family)
        if layout is None:
            return
        if not self.llama_style:
            raise ConfigError(f"{p}family: {self.family} needs {', '.join(LLAMA_PARTS)}")
        if self.linear_biases() != layout:
            raise ConfigError(
                f"{p}family: {self.family} has biases on (wq/wk/wv, wo, mlp) = {layout}, but "
                f"the bias flags give {self.linear_biases()}; leave them null"
            )


# ----------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 like Llama."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def build_norm(cfg: ModelConfig) -> nn.Module:
    """The configured norm layer of width cfg.dim."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)


# ----------------------------------------------------------------------------- the blocks


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (GQA; MHA and MQA as special cases)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head = cfg.n_heads, cfg.kv_heads, cfg.head_size
        qkv, out, _ = cfg.linear_biases()
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head, bias=qkv)
        self.wk = nn.Linear(cfg.dim, self.n_kv * self.head, bias=qkv)
        self.wv = nn.Linear(cfg.dim, self.n_kv * self.head, bias=qkv)
        self.wo = nn.Linear(self.n_heads * self.head, cfg.dim, bias=out)
        self.attn_dropout = cfg.attn_dropout
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head).transpose(1, 2)  # (B, H, T, E)
        k = self.wk(x).view(b, t, self.n_kv, self.head).transpose(1, 2)  # (B, K, T, E)
        v = self.wv(x).view(b, t, self.n_kv, self.head).transpose(1, 2)  # (B, K, T, E)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, E)
        dropout = self.attn_dropout if self.training else 0.0
        y = attend(q, k, v, mask, dropout, expand_kv=EXPAND_MASKED_KV[q.device.type])
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head)  # (B, T, H·E)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x), or GELU: w2(gelu(w1 x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        bias = cfg.linear_biases()[2]
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=bias)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=bias)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=bias) if self.gated else None
        self.dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D) through (B, T, F)."""
        if self.w3 is not None:
            h = F.silu(self.w1(x)) * self.w3(x)
        else:
            h = F.gelu(self.w1(x), approximate="tanh")  # GPT-2's tanh approximation
        return self.dropout(self.w2(h))


class Block(nn.Module):
    """Attention then feed-forward, each with a residual connection and a norm (pre or post)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = build_norm(cfg)
        self.ffn_norm = build_norm(cfg)

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        if self.pre_norm:
            x = x + self.attention(self.attention_norm(x), mask, rope, cache, layer)
            return x + self.feed_forward(self.ffn_norm(x))
        x = self.attention_norm(x + self.attention(x, mask, rope, cache, layer))
        return self.ffn_norm(x + self.feed_forward(x))


class LMHead(nn.Module):
    """Output projection to the vocabulary; with labels it returns the loss without ever holding
    fp32 logits for all rows at once (see `lmforge.loss`). A module of its own so that ZeRO-3
    gathers its weight when it runs."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim))

    def forward(
        self,
        h: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss: LossConfig | None = None,
        *,
        logprob_labels: torch.Tensor | None = None,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> Any:
        """h (B, T, D) -> logits (B, T, V); with labels (B, T) -> (loss sum, token count); with
        logprob_labels (B, T) -> per-token log-probs (B, T) and entropies (B, T) or None, from
        logits computed a chunk of rows at a time (lmforge.prefs.token_logprobs_chunked)."""
        if logprob_labels is not None:
            from lmforge.prefs import token_logprobs_chunked  # prefs builds on this module

            return token_logprobs_chunked(
                h, self.weight, logprob_labels, temperature=temperature, with_entropy=with_entropy
            )
        if labels is None:
            return F.linear(h, self.weight)
        return linear_cross_entropy(h.flatten(0, 1), self.weight, labels.flatten(), loss)


# ----------------------------------------------------------------------------------- the GPT


class GPT(nn.Module):
    """Decoder-only transformer. `model(input_ids)` returns logits (B, T, V); with `labels` it
    returns the mean cross-entropy over labelled tokens (labels == -100 are ignored)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate("model")
        self.cfg = cfg
        self.loss_cfg = LossConfig()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.position == "learned":
            self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.dropout = nn.Dropout(cfg.embed_dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.rope_scaling = cfg.rope_scaling()  # built once: a constant to torch.compile
        # Post-norm blocks already end in a norm; pre-norm needs a final one (GPT-2).
        self.norm = build_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.output = LMHead(cfg.dim, cfg.vocab_size)
        # Recompute each block in backward instead of keeping its activations (training only);
        # a run setting (engine.activation_checkpointing), not part of the architecture.
        self.activation_checkpointing = False
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make the output projection share the input embedding when configured."""
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) weights, zero biases, unit norms; GPT-2's 1/sqrt(2L) scaling on
        the projections that write into the residual stream (Radford et al. 2019)."""
        cfg = self.cfg
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias" or p.ndim == 1:
                p.zero_() if leaf == "bias" else p.fill_(1.0)
                continue
            std = cfg.init_std
            if cfg.scaled_residual_init and name.endswith(("attention.wo.weight", "w2.weight")):
                std = residual_std
            p.normal_(0.0, std, generator=generator)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        attention: AttentionKind = "causal",
        prefix_len: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
        logprob_labels: torch.Tensor | None = None,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> Any:
        """input_ids (B, T) -> logits (B, T, V), or (B, 1, V) with last_only, or the mean loss
        when labels (B, T) are given, or with return_hidden the final hidden states (B, T, D)
        after the last norm, or with logprob_labels (B, T) the per-token log-probs of those
        labels under softmax(logits / temperature) and, with_entropy, the entropies: (B, T)
        each, computed inside the output layer's own forward (where ZeRO-3 has its weight
        whole) a chunk of rows at a time, never the fp32 (B, T, V) logits.

        attention_mask (B, T): 1 for real tokens, 0 for padding (with a cache: the new tokens'
        flags; the cache keeps the earlier ones). position_ids (B, T) default to cache length +
        0..T-1. doc_ids (B, T) block attention across packed documents.
        """
        h = self.hidden_states(
            input_ids,
            attention=attention,
            prefix_len=prefix_len,
            doc_ids=doc_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=cache,
        )
        if return_hidden:
            return h
        if logprob_labels is not None:
            return self.output(
                h, logprob_labels=logprob_labels, temperature=temperature, with_entropy=with_entropy
            )
        if labels is not None:
            loss_sum, count = self.output(h, labels, self.loss_cfg)
            return loss_sum / count.clamp(min=1)
        if last_only:
            h = h[:, -1:]  # (B, 1, D)
        return self.output(h)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        attention: AttentionKind = "causal",
        prefix_len: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> final hidden states (B, T, D), after the last norm."""
        b, t = input_ids.shape
        static = cache is not None and cache.static
        start = self._start(t, cache, position_ids, attention_mask)
        if position_ids is None:
            positions = torch.arange(start, start + t, device=input_ids.device)  # (T,)
            position_ids = positions.expand(b, t)  # (B, T)
        x = self._embed(input_ids, position_ids)  # (B, T, D)
        key_valid = track_key_validity(cache, attention_mask, start, t)  # (B, S) or None
        if static:
            assert cache is not None
            mask = static_decode_mask(self.cfg, cache, x.dtype)
        else:
            mask = build_attention_mask(
                self.cfg,
                attention,
                batch=b,
                q_len=t,
                start=start,
                device=input_ids.device,
                dtype=x.dtype,
                prefix_len=prefix_len,
                doc_ids=doc_ids,
                key_valid=key_valid,
            )
        rope = None
        if self.cfg.position == "rope":
            cfg = self.cfg
            rope = rope_cos_sin(
                position_ids, cfg.head_size, cfg.rope_theta, x.dtype, self.rope_scaling
            )
        x = self._run_layers(x, mask, rope, cache)
        if cache is not None and not static:
            cache.length = start + t
        return self.norm(x)

    def _start(
        self,
        q_len: int,
        cache: KVCache | None,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> int:
        """Sequence index of the first of q_len new tokens (the cache length, or 0), after
        rejecting inputs a static cache cannot take and sequences past max_seq_len."""
        static = cache is not None and cache.static
        if static and (q_len != 1 or position_ids is None or attention_mask is not None):
            raise ValueError("a static cache decodes one token at a time, with position_ids")
        start = cache.length if cache is not None else 0
        # A static cache writes at its device-side index; its length is not advanced.
        limit = self.cfg.max_seq_len
        if not static and start + q_len > limit:
            raise ValueError(
                f"sequence of {start + q_len} tokens exceeds model.max_seq_len={limit}"
            )
        return start

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, D) of input_ids (B, T), plus the learned or sinusoidal
        position embeddings of position_ids (B, T), through the embedding dropout."""
        x = self.tok_embeddings(input_ids)  # (B, T, D)
        if self.cfg.position == "learned":
            x = x + self.pos_embeddings(position_ids)
        elif self.cfg.position == "sinusoidal":
            x = x + sinusoidal_table(position_ids, self.cfg.dim).to(x.dtype)
        return self.dropout(x)

    def _run_layers(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """x (B, T, D) through every block -> (B, T, D); blocks are recomputed in backward when
        activation checkpointing is on (training without a cache only)."""
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute and cache is None:
                x = checkpoint(layer, x, mask, rope, None, i, use_reentrant=False)
            else:
                x = layer(x, mask, rope, cache, i)
        return x


def build_model(
    cfg: ModelConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> GPT:
    """Construct and initialise the GPT. On device "meta" nothing is allocated or initialised
    (used to count parameters of presets too large to build)."""
    kwargs = {"device": device} if device is not None else {}
    with torch.device(kwargs.get("device", "cpu")):
        model = GPT(cfg)
    if str(device) != "meta":
        gen = None
        if seed is not None:
            gen = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(seed)
        model.init_weights(gen)
    if dtype is not None:
        model = model.to(dtype)
    return model


def checkpoint_layers(model: nn.Module) -> int:
    """Turn on activation checkpointing in every GPT inside `model` (a GPT, a reward model, a
    LoRA wrapper); returns how many. Losses and gradients are unchanged (dropout included: the
    recomputation replays the RNG state)."""
    gpts = [m for m in model.modules() if isinstance(m, GPT)]
    if not gpts:
        raise ConfigError("engine.activation_checkpointing: needs an lmforge GPT inside the model")
    for gpt in gpts:
        gpt.activation_checkpointing = True
    return len(gpts)


# ------------------------------------------------------------------------- size and FLOPs


def num_params(cfg: ModelConfig, *, embeddings: bool = True) -> int:
    """Parameters of the model (shared tied weights counted once), measured on the meta device."""
    model = build_model(cfg, device="meta")
    total = sum(p.numel() for p in model.parameters())  # parameters() dedups tied weights
    if not embeddings:
        total -= model.tok_embeddings.weight.numel()
        if cfg.position == "learned":
            total -= model.pos_embeddings.weight.numel()
    return total


def matmul_params(cfg: ModelConfig) -> int:
    """N of the PaLM MFU formula: weights of every matrix multiply, the output layer included
    (embedding lookups, norms and biases excluded)."""
    d, e, h, k, f = cfg.dim, cfg.head_size, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim
    attention = d * h * e * 2 + d * k * e * 2  # wq, wo; wk, wv
    mlp = d * f * (3 if cfg.mlp == "swiglu" else 2)
    return cfg.n_layers * (attention + mlp) + cfg.vocab_size * d


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, forward and backward (PaLM, Chowdhery et al. 2022, app. B):
    6·N + 12·L·(H·E)·T."""
    return 6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len
