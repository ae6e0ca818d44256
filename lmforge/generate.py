"""Batched sampling with a KV cache: greedy, temperature, top-k, top-p, EOS and stop strings.

Prompts of different lengths are left-padded so that every row's next token sits in the last
column; positions count real tokens only, so a padded row computes what it would alone. Each new
token comes with its log-probability under the temperature-scaled distribution (before top-k /
top-p truncation), which RLHF stages use as the behaviour policy's log-probs.

Shapes: B prompts, P padded prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from lmforge.config import option
from lmforge.errors import ConfigError
from lmforge.model import GPT, KVCache, ModelConfig


@dataclass
class GenerateConfig:
    """Sampling settings."""

    max_new_tokens: int = option(64, "Most tokens generated per prompt.")
    temperature: float = option(1.0, "Softmax temperature; 0 = greedy (argmax).")
    top_k: int = option(0, "Sample among the k most likely tokens; 0 = no limit.")
    top_p: float = option(1.0, "Nucleus sampling: smallest set with this much mass; 1 = off.")
    stop_strings: list[str] = option(
        default_factory=list, doc="Stop a row once its generated text contains one of these."
    )
    seed: int = option(0, "Seed of the sampling generator (same seed, same tokens).")
    static_cache: bool = option(
        False, "Decode with fixed shapes over the whole preallocated cache (same tokens)."
    )
    compile: bool = option(
        False, "torch.compile the one-token decode step (static cache; CUDA graphs on GPUs)."
    )

    def validate(self, prefix: str = "generate") -> None:
        """Reject values outside their range, naming the key."""
        p = f"{prefix}." if prefix else ""
        if self.max_new_tokens <= 0:
            raise ConfigError(f"{p}max_new_tokens: must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"{p}temperature: must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"{p}top_k: must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{p}top_p: must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """Generated tokens of a batch. Rows end at EOS / a stop string; the rest is pad."""

    tokens: torch.Tensor  # (B, N) new tokens
    logprobs: torch.Tensor  # (B, N) log p(token), 0 where padded
    lengths: torch.Tensor  # (B,) generated tokens per row, the stopping token included
    prompt_tokens: torch.Tensor  # (B, P) left-padded prompts
    prompt_mask: torch.Tensor  # (B, P) 1 for real prompt tokens
    stopped: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # (B,)

    @property
    def response_mask(self) -> torch.Tensor:
        """(B, N) 1 for generated tokens, 0 for padding after a row stopped."""
        n = self.tokens.shape[1]
        return torch.arange(n, device=self.tokens.device)[None] < self.lengths[:, None]

    def texts(self, tokenizer: object, *, skip_special_tokens: bool = True) -> list[str]:
        """Decode each row's generated tokens."""
        return [
            tokenizer.decode(row[:n].tolist(), skip_special_tokens=skip_special_tokens)  # type: ignore[attr-defined]
            for row, n in zip(self.tokens, self.lengths.tolist(), strict=True)
        ]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, P) ids left-padded with pad_id and the (B, P) mask of real tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits (B, V) outside the top-k and the top-p nucleus to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _hit_stop_string(
    tokens: torch.Tensor, row: int, upto: int, tokenizer: object, stops: Sequence[str]
) -> bool:
    # Byte-level tokens can carry a quarter of a character: look back 4 tokens per character.
    window = 4 * max(len(s) for s in stops) + 4
    text = tokenizer.decode(tokens[row, max(0, upto - window) : upto].tolist())  # type: ignore[attr-defined]
    return any(s in text for s in stops)


# A row's EOS is looked for on the device every step; whether every row has stopped is read
# back every this many steps (a host sync), and the output is trimmed to the longest row, so the
# result is the same as checking every step.
_FINISHED_EVERY = 8
# Static caches are rounded up to a multiple of this, so prompts of nearby lengths share a
# compiled decode step.
_STATIC_ROUND = 64


def _decode_step(
    model: GPT, token: torch.Tensor, position: torch.Tensor, cache: KVCache
) -> torch.Tensor:
    """One token per row (B, 1) at `position` (B, 1) through a static cache -> logits (B, 1, V)."""
    return model(token, position_ids=position, cache=cache, last_only=True)


_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}
# Caches of the compiled path, kept between calls: a CUDA graph reads and writes fixed
# addresses, and a new cache per call would recompile (or re-record) the step every time.
_STATIC_CACHES: dict[tuple[object, ...], KVCache] = {}
_MAX_STATIC_CACHES = 4


def release_static_caches() -> None:
    """Free the KV caches that `generate(..., compile=True)` keeps for its next calls."""
    _STATIC_CACHES.clear()


def _static_cache(
    cfg: ModelConfig, batch: int, size: int, dtype: torch.dtype, device: torch.device
) -> KVCache:
    """A kept cache of this shape, emptied; a new one (kept too) when there is none."""
    key = (cfg.n_layers, cfg.kv_heads, cfg.head_size, batch, size, dtype, str(device))
    cache = _STATIC_CACHES.get(key)
    if cache is None:
        if len(_STATIC_CACHES) >= _MAX_STATIC_CACHES:
            _STATIC_CACHES.clear()
        cache = _STATIC_CACHES[key] = KVCache(cfg, batch, size, dtype=dtype, device=device)
    cache.reset()
    return cache


def _compiled_decode(device: torch.device) -> Callable[..., torch.Tensor]:
    """`_decode_step` under torch.compile, one per device type (its guards tell models and
    shapes apart): CUDA graphs (mode reduce-overhead) on a GPU, inductor's default on CPU."""
    if device.type not in _COMPILED:
        mode = "reduce-overhead" if device.type == "cuda" else None
        _COMPILED[device.type] = torch.compile(_decode_step, mode=mode, dynamic=False)
    return _COMPILED[device.type]


def _eager() -> AbstractContextManager[object]:
    """Run a torch.compile'd model eagerly (an engine may have compiled it for training): the
    dynamic cache changes shape every step and would only recompile."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else nullcontext()


@torch.no_grad()
def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    cfg: GenerateConfig | None = None,
    *,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    tokenizer: object | None = None,
    use_cache: bool = True,
) -> Generation:
    """Continue each prompt (a list of token ids) until EOS, a stop string or max_new_tokens.

    Stop strings need the tokenizer. use_cache=False recomputes the whole sequence every step
    (the reference the cache is tested against); cfg.static_cache / cfg.compile decode through
    fixed shapes (the same tokens).
    """
    cfg = cfg or GenerateConfig()
    cfg.validate("generate")
    if cfg.stop_strings and tokenizer is None:
        raise ConfigError("generate.stop_strings: needs a tokenizer to decode the text")
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    b, p = ids.shape
    limit = model.cfg.max_seq_len
    if p + cfg.max_new_tokens > limit:
        raise ConfigError(
            f"generate.max_new_tokens: prompt of {p} tokens + {cfg.max_new_tokens} new tokens "
            f"exceeds model.max_seq_len={limit}"
        )
    static = use_cache and (cfg.static_cache or cfg.compile)
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    out = torch.full((b, cfg.max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros(b, cfg.max_new_tokens, dtype=torch.float32, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    stopped = torch.zeros(b, dtype=torch.bool, device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): left padding does not count
    cache = None
    if use_cache:
        dtype = next(model.parameters()).dtype
        size = p + cfg.max_new_tokens
        if static:
            size = min(limit, -(-size // _STATIC_ROUND) * _STATIC_ROUND)
        if static and cfg.compile:
            cache = _static_cache(model.cfg, b, size, dtype, device)
        else:
            cache = KVCache(model.cfg, b, size, dtype=dtype, device=device)
    seq, seq_mask, seq_pos = ids, mask, positions
    with _eager():
        logits = model(
            ids, attention_mask=mask, position_ids=positions, cache=cache, last_only=True
        )
    step_fn: Callable[..., torch.Tensor] = _decode_step
    if cache is not None and static:
        cache.make_static(compiled=cfg.compile)
        if cfg.compile:
            step_fn = _compiled_decode(device)
    may_stop = len(eos) > 0 or bool(cfg.stop_strings)
    # One eager stance around the loop (entering it costs about as much as a small op).
    with nullcontext() if static and cfg.compile else _eager():
        for i in range(cfg.max_new_tokens):
            scores = logits[:, -1].float()  # (B, V)
            if cfg.temperature > 0 and cfg.temperature != 1.0:
                scores = scores / cfg.temperature
            if cfg.temperature == 0:
                token = scores.argmax(dim=-1)  # (B,)
            else:
                probs = torch.softmax(filter_logits(scores, cfg.top_k, cfg.top_p), dim=-1)
                token = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # (B,)
            # log p(token) = score - logsumexp: log_softmax's value without its (B, V) output
            lse = torch.logsumexp(scores, dim=-1)  # (B,)
            lp = scores.gather(1, token[:, None]).squeeze(1) - lse  # (B,)
            out[:, i] = torch.where(finished, pad_id, token)
            out_lp[:, i] = torch.where(finished, 0.0, lp)
            lengths += (~finished).long()
            if may_stop:
                done = torch.isin(token, eos) if len(eos) else torch.zeros_like(finished)
                if cfg.stop_strings:
                    for row in (~finished & ~done).nonzero().flatten().tolist():
                        if _hit_stop_string(out, row, i + 1, tokenizer, cfg.stop_strings):
                            done[row] = True
                stopped |= done & ~finished
                finished |= done
                check = cfg.stop_strings or i % _FINISHED_EVERY == _FINISHED_EVERY - 1
                if check and bool(finished.all()):
                    break
            if i + 1 == cfg.max_new_tokens:
                break
            next_pos = seq_pos[:, -1:] + 1  # (B, 1)
            step_ids = token[:, None]  # (B, 1)
            if cache is not None and static:
                if cfg.compile and device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                logits = step_fn(model, step_ids, next_pos, cache)
                assert cache.index is not None
                cache.index += 1
            elif cache is not None:
                logits = model(step_ids, position_ids=next_pos, cache=cache, last_only=True)
            else:
                seq = torch.cat([seq, step_ids], dim=1)
                seq_mask = torch.cat([seq_mask, torch.ones_like(step_ids)], dim=1)
                logits = model(
                    seq,
                    attention_mask=seq_mask,
                    position_ids=torch.cat([seq_pos, next_pos], 1),
                    last_only=True,
                )
            seq_pos = torch.cat([seq_pos, next_pos], dim=1) if cache is None else next_pos
    model.train(was_training)
    steps = int(lengths.max())  # the step at which the last row stopped, or max_new_tokens
    return Generation(out[:, :steps], out_lp[:, :steps], lengths, ids, mask, stopped)
