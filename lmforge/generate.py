"""Batched sampling with a KV cache: greedy, temperature, top-k, top-p, EOS and stop strings.

Prompts of different lengths are left-padded so that every row's next token sits in the last
column; positions count real tokens only, so a padded row computes what it would alone. Each new
token comes with its log-probability under the temperature-scaled distribution (before top-k /
top-p truncation), which RLHF stages use as the behaviour policy's log-probs.
With a drafter (`draft=`, lmforge.speculative) the model checks several proposed tokens per
forward and returns the same tokens (greedy, row seeds) or the same distribution.

Shapes: B prompts, P padded prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmforge.config import option
from lmforge.errors import ConfigError
from lmforge.model import GPT, KVCache, ModelConfig

if TYPE_CHECKING:
    from lmforge.speculative import Drafter


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
    draft: str = option(
        "",
        "Speculative decoding's drafter: '' none, 'ngram' (prompt lookup) or a checkpoint with "
        "the same tokenizer; the caller builds it (lmforge.speculative.build_drafter).",
    )
    draft_tokens: int = option(4, "Tokens a drafter proposes per round; 0 = adaptive (1-12).")

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
        if self.draft_tokens < 0:
            raise ConfigError(f"{p}draft_tokens: must be >= 0, got {self.draft_tokens}")


@dataclass
class DecodeStats:
    """What a decode cost: model forwards (the prompt's included); with a drafter, also the
    rounds, the tokens proposed to and accepted by rows still generating, the drafter's
    forwards and the cache compactions."""

    forwards: int = 0
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    draft_forwards: int = 0
    compactions: int = 0

    @property
    def acceptance(self) -> float:
        """Accepted / proposed tokens (0 without proposals)."""
        return self.accepted / self.proposed if self.proposed else 0.0


@dataclass
class Generation:
    """Generated tokens of a batch. Rows end at EOS / a stop string; the rest is pad."""

    tokens: torch.Tensor  # (B, N) new tokens
    logprobs: torch.Tensor  # (B, N) log p(token), 0 where padded
    lengths: torch.Tensor  # (B,) generated tokens per row, the stopping token included
    prompt_tokens: torch.Tensor  # (B, P) left-padded prompts
    prompt_mask: torch.Tensor  # (B, P) 1 for real prompt tokens
    stopped: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # (B,)
    stats: DecodeStats = field(default_factory=DecodeStats)

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
# back every step on CPU (free there) and every this many steps on an accelerator (a host sync
# that would stall the queued kernels); the output is trimmed to the longest row, so the result
# is the same as checking every step.
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


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


# SplitMix64's constants (Steele, Lea and Flood 2014): a counter-based generator whose output
# for (row seed, step, token id) needs no state, so a row samples the same tokens whatever
# batch, process or padding it is in.
_GOLDEN, _MIX1, _MIX2 = (
    _signed(0x9E3779B97F4A7C15),
    _signed(0xBF58476D1CE4E5B9),
    _signed(0x94D049BB133111EB),
)


def _shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic on negative values)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser: every output bit depends on every input bit."""
    x = (x ^ _shift(x, 30)) * _MIX1
    x = (x ^ _shift(x, 27)) * _MIX2
    return x ^ _shift(x, 31)


def row_uniforms(row_seeds: torch.Tensor, step: int | torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform numbers in (0, 1), (B, V) float64: SplitMix64 hashes of (row seed, decode step)
    and then of that and the token id; `step` is one int or one per row (B,). int64 products
    wrap around, as the hash wants."""
    steps = torch.as_tensor(step, dtype=torch.long, device=row_seeds.device) + 1
    base = _mix(row_seeds * _GOLDEN + _mix(steps.expand_as(row_seeds)))  # (B,)
    ids = torch.arange(1, vocab + 1, device=row_seeds.device, dtype=torch.long)  # (V,)
    x = _mix(base[:, None] + ids[None] * _GOLDEN)  # (B, V)
    return (_shift(x, 11).double() + 0.5) * 2.0**-53  # 53 random bits, never 0 or 1


def _sample(
    scores: torch.Tensor, gen: torch.Generator, row_seeds: torch.Tensor | None, step: int
) -> torch.Tensor:
    """A token (B,) from softmax(scores) (B, V); -inf scores are never picked. With row seeds,
    the Gumbel-max trick (argmax of scores + Gumbel noise is an exact sample) on per-row
    counter-based noise; otherwise torch's sampler on the batch's generator."""
    if row_seeds is None:
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(1)
    gumbel = -torch.log(-torch.log(row_uniforms(row_seeds, step, scores.shape[-1])))  # (B, V)
    return (scores.double() + gumbel).argmax(dim=-1)


def _pick_token(
    logits: torch.Tensor,
    cfg: GenerateConfig,
    gen: torch.Generator,
    row_seeds: torch.Tensor | None = None,
    step: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token (B,) from the last position of logits (B, T, V), greedy or sampled, and its
    log-probability (B,) under the temperature-scaled distribution (before top-k / top-p)."""
    scores = logits[:, -1].float()  # (B, V)
    if cfg.temperature > 0 and cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.temperature == 0:
        token = scores.argmax(dim=-1)  # (B,)
    else:
        token = _sample(filter_logits(scores, cfg.top_k, cfg.top_p), gen, row_seeds, step)
    # log p(token) = score - logsumexp: log_softmax's value without its (B, V) output
    lse = torch.logsumexp(scores, dim=-1)  # (B,)
    return token, scores.gather(1, token[:, None]).squeeze(1) - lse


@dataclass
class _Rows:
    """Per-row output of a decode, filled one step at a time."""

    tokens: torch.Tensor  # (B, N) new tokens, pad after a row stopped
    logprobs: torch.Tensor  # (B, N) log p(token), 0 after a row stopped
    lengths: torch.Tensor  # (B,) tokens generated so far, the stopping token included
    finished: torch.Tensor  # (B,) the row has stopped (EOS, stop string)
    stopped: torch.Tensor  # (B,) the row stopped before max_new_tokens

    @classmethod
    def empty(cls, batch: int, steps: int, pad_id: int, device: torch.device) -> _Rows:
        """Rows of `steps` pad tokens, none finished."""
        return cls(
            torch.full((batch, steps), pad_id, dtype=torch.long, device=device),
            torch.zeros(batch, steps, dtype=torch.float32, device=device),
            torch.zeros(batch, dtype=torch.long, device=device),
            torch.zeros(batch, dtype=torch.bool, device=device),
            torch.zeros(batch, dtype=torch.bool, device=device),
        )

    def record(self, step: int, token: torch.Tensor, logprob: torch.Tensor, pad_id: int) -> None:
        """Write step's token (B,) and log-prob (B,) into the rows not yet finished."""
        self.tokens[:, step] = torch.where(self.finished, pad_id, token)
        self.logprobs[:, step] = torch.where(self.finished, 0.0, logprob)
        self.lengths += (~self.finished).long()


@dataclass
class _Stops:
    """When rows stop: at one of the EOS ids, or once their text holds a stop string."""

    eos: torch.Tensor  # (n,) EOS token ids
    strings: Sequence[str]
    tokenizer: object | None

    @property
    def active(self) -> bool:
        """Whether any row can stop before max_new_tokens."""
        return len(self.eos) > 0 or bool(self.strings)

    def all_finished(self, rows: _Rows, step: int, token: torch.Tensor) -> bool:
        """Mark the rows that stop at step's token (B,); True once every row has stopped (read
        back only every few steps without stop strings, see _FINISHED_EVERY)."""
        done = torch.isin(token, self.eos) if len(self.eos) else torch.zeros_like(rows.finished)
        if self.strings:
            for row in (~rows.finished & ~done).nonzero().flatten().tolist():
                if _hit_stop_string(rows.tokens, row, step + 1, self.tokenizer, self.strings):
                    done[row] = True
        rows.stopped |= done & ~rows.finished
        rows.finished |= done
        # Stop strings already synced to read the rows back, and a CPU has no queue to stall,
        # so checking is free then.
        sparse = rows.finished.device.type != "cpu"
        check = self.strings or not sparse or step % _FINISHED_EVERY == _FINISHED_EVERY - 1
        return bool(check) and bool(rows.finished.all())


# A decode step: the tokens just picked (B, 1) -> logits (B, 1, V) of the next position.
_Step = Callable[[torch.Tensor], torch.Tensor]


def _static_step(model: GPT, cache: KVCache, positions: torch.Tensor, compiled: bool) -> _Step:
    """Decode through a static cache (see KVCache.make_static) from prompt positions (B, P),
    with the torch.compile'd step when `compiled`."""
    device = positions.device
    step_fn = _compiled_decode(device) if compiled else _decode_step
    last = positions[:, -1:]  # (B, 1)

    def step(ids: torch.Tensor) -> torch.Tensor:
        nonlocal last
        last = last + 1  # (B, 1)
        if compiled and device.type == "cuda":
            # A new CUDA-graph replay: the previous step's outputs may be overwritten now.
            torch.compiler.cudagraph_mark_step_begin()
        logits = step_fn(model, ids, last, cache)
        assert cache.index is not None
        cache.index += 1
        return logits

    return step


def _cached_step(model: GPT, cache: KVCache, positions: torch.Tensor) -> _Step:
    """Decode through a cache that grows by one token per step, from prompt positions (B, P)."""
    last = positions[:, -1:]  # (B, 1)

    def step(ids: torch.Tensor) -> torch.Tensor:
        nonlocal last
        last = last + 1  # (B, 1)
        return model(ids, position_ids=last, cache=cache, last_only=True)

    return step


def _recompute_step(
    model: GPT, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
) -> _Step:
    """Decode without a cache: every step runs the whole sequence so far (prompt ids, mask and
    positions (B, P), then one more column per step); the reference the caches match."""
    seq, seq_mask, seq_pos = ids, mask, positions

    def step(step_ids: torch.Tensor) -> torch.Tensor:
        nonlocal seq, seq_mask, seq_pos
        next_pos = seq_pos[:, -1:] + 1  # (B, 1)
        seq = torch.cat([seq, step_ids], dim=1)  # (B, P + i + 1)
        seq_mask = torch.cat([seq_mask, torch.ones_like(step_ids)], dim=1)
        seq_pos = torch.cat([seq_pos, next_pos], dim=1)
        return model(seq, attention_mask=seq_mask, position_ids=seq_pos, last_only=True)

    return step


def _decode(
    logits: torch.Tensor,
    step: _Step,
    cfg: GenerateConfig,
    rows: _Rows,
    stops: _Stops,
    pad_id: int,
    row_seeds: torch.Tensor | None,
) -> int:
    """Pick up to cfg.max_new_tokens tokens into `rows`, starting from the prompt's logits
    (B, 1, V); `step` runs the model on each picked token (a _ShrinkingStep runs only the rows
    still generating: picks widen to the batch, and narrow again before the step). Returns the
    forwards it ran."""
    gen = torch.Generator(device=logits.device).manual_seed(cfg.seed)
    shrink = step if isinstance(step, _ShrinkingStep) else None
    may_stop = stops.active
    forwards = 0
    for i in range(cfg.max_new_tokens):
        seeds = shrink.seeds if shrink is not None else row_seeds
        token, lp = _pick_token(logits, cfg, gen, seeds, i)  # (A,): the rows the step ran
        if shrink is not None:
            token, lp = shrink.widen(token, lp, pad_id)  # (B,)
        rows.record(i, token, lp, pad_id)
        if may_stop and stops.all_finished(rows, i, token):
            break
        if i + 1 == cfg.max_new_tokens:
            break  # the last token needs no forward
        if shrink is not None:
            token = shrink.narrow(rows.finished, token)
        logits = step(token[:, None])
        forwards += 1
    return forwards


def _new_cache(model: GPT, cfg: GenerateConfig, batch: int, size: int, static: bool) -> KVCache:
    """A cache for `size` tokens per row: rounded up and kept between calls when compiled."""
    param = next(model.parameters())
    if static:
        # Nearby prompt lengths share one cache shape, hence one compiled step.
        size = min(model.cfg.max_seq_len, -(-size // _STATIC_ROUND) * _STATIC_ROUND)
    if static and cfg.compile:
        return _static_cache(model.cfg, batch, size, param.dtype, param.device)
    return KVCache(model.cfg, batch, size, dtype=param.dtype, device=param.device)


def _check_settings(cfg: GenerateConfig, tokenizer: object | None) -> None:
    """Reject values outside their range and stop strings without a tokenizer."""
    cfg.validate("generate")
    if cfg.stop_strings and tokenizer is None:
        raise ConfigError("generate.stop_strings: needs a tokenizer to decode the text")


def _check_length(model: GPT, cfg: GenerateConfig, prompt_len: int) -> None:
    """Reject prompts that max_new_tokens would take past the model's position limit."""
    limit = model.cfg.max_seq_len
    if prompt_len + cfg.max_new_tokens > limit:
        raise ConfigError(
            f"generate.max_new_tokens: prompt of {prompt_len} tokens + {cfg.max_new_tokens} new "
            f"tokens exceeds model.max_seq_len={limit}"
        )


def _prefill(
    model: GPT,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache | None,
) -> torch.Tensor:
    """The prompts' forward (ids, mask, positions (B, P)) into `cache` -> last logits (B, 1, V).
    Rows with the same prompt (a GRPO or PPO group: G rows per prompt) share one computation,
    copied into each row's cache slots."""
    if cache is None:
        return model(ids, attention_mask=mask, position_ids=positions, last_only=True)
    # (U, 2P) distinct prompts; inverse (B,): each row's among them
    distinct, inverse = torch.unique(torch.cat([ids, mask], 1), dim=0, return_inverse=True)
    if len(distinct) == len(ids):
        return model(ids, attention_mask=mask, position_ids=positions, cache=cache, last_only=True)
    # one row of each distinct prompt (U,): scatter keeps some row of every group
    first = torch.empty(len(distinct), dtype=torch.long, device=ids.device)
    first.scatter_(0, inverse, torch.arange(len(ids), device=ids.device))
    own = KVCache(
        model.cfg, len(first), ids.shape[1], dtype=cache.k[0].dtype, device=cache.k[0].device
    )
    logits = model(
        ids[first], attention_mask=mask[first], position_ids=positions[first], cache=own,
        last_only=True,
    )  # fmt: skip
    cache.load_rows(own, inverse)  # own row u holds distinct prompt u
    return logits[inverse]


def _can_shrink(
    cfg: GenerateConfig, device: torch.device, stops: _Stops, seeds: torch.Tensor | None
) -> bool:
    """Whether finished rows may leave the decode batch: on a CPU (where a step's cost grows
    with its rows and reading back which rows stopped is free), when rows can stop, and when a
    row's tokens do not depend on its batch (greedy, or its own seeded stream: a shared
    generator's draws would shift)."""
    return device.type == "cpu" and stops.active and (cfg.temperature == 0 or seeds is not None)


class _ShrinkingStep:
    """Decode through a growing cache whose batch shrinks: once an eighth of the rows still in
    it have stopped, they leave it (cache rows, positions, seeds), so the steps after the short
    answers run only the rows still generating (a GRPO batch of 2-token answers and one long
    one). The same tokens as the full batch (see `_can_shrink`)."""

    def __init__(
        self, model: GPT, cache: KVCache, positions: torch.Tensor, seeds: torch.Tensor | None
    ) -> None:
        self.model, self.cache, self.seeds = model, cache, seeds
        self.batch = positions.shape[0]  # B
        self.alive = torch.arange(positions.shape[0], device=positions.device)  # (A,) rows run
        self.last = positions[:, -1:]  # (A, 1)

    def widen(
        self, token: torch.Tensor, logprob: torch.Tensor, pad_id: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The alive rows' token and log-prob (A,) placed into the whole batch (B,)."""
        full = torch.full((self.batch,), pad_id, dtype=torch.long, device=token.device)
        full_lp = torch.zeros(self.batch, dtype=logprob.dtype, device=logprob.device)
        full[self.alive], full_lp[self.alive] = token, logprob
        return full, full_lp

    def narrow(self, finished: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """Drop the rows that finished once they are an eighth of the batch; the alive rows'
        tokens (A,) of the whole batch's `token` (B,)."""
        keep = ~finished[self.alive]  # (A,)
        if int((~keep).sum()) * 8 >= len(keep):
            self.alive, self.last = self.alive[keep], self.last[keep]
            self.seeds = self.seeds[keep] if self.seeds is not None else None
            self.cache.keep_rows(keep)
        return token[self.alive]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.last = self.last + 1  # (A, 1)
        return self.model(ids, position_ids=self.last, cache=self.cache, last_only=True)


def _decode_plain(
    model: GPT,
    ids: torch.Tensor,
    mask: torch.Tensor,
    cfg: GenerateConfig,
    rows: _Rows,
    stops: _Stops,
    pad_id: int,
    seeds: torch.Tensor | None,
    use_cache: bool,
) -> DecodeStats:
    """One token per model forward from prompts ids (B, P) with mask (B, P) into `rows`."""
    b, p = ids.shape
    static = use_cache and (cfg.static_cache or cfg.compile)
    compiled = static and cfg.compile
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): left padding does not count
    cache = _new_cache(model, cfg, b, p + cfg.max_new_tokens, static) if use_cache else None
    with _eager():
        logits = _prefill(model, ids, mask, positions, cache)
    if cache is None:
        step = _recompute_step(model, ids, mask, positions)
    elif static:
        cache.make_static(compiled=cfg.compile)
        step = _static_step(model, cache, positions, compiled)
    elif _can_shrink(cfg, ids.device, stops, seeds):
        step = _ShrinkingStep(model, cache, positions, seeds)
    else:
        step = _cached_step(model, cache, positions)
    # One eager stance around the loop (entering it costs about as much as a small op).
    with nullcontext() if compiled else _eager():
        forwards = _decode(logits, step, cfg, rows, stops, pad_id, seeds)
    return DecodeStats(forwards=1 + forwards)


def _decode_draft(
    model: GPT,
    ids: torch.Tensor,
    mask: torch.Tensor,
    cfg: GenerateConfig,
    rows: _Rows,
    stops: _Stops,
    pad_id: int,
    seeds: torch.Tensor | None,
    draft: Drafter,
) -> DecodeStats:
    """Speculative decoding (lmforge.speculative) through dynamic caches."""
    from lmforge.speculative import decode_speculative

    if cfg.static_cache or cfg.compile:
        raise ConfigError(
            "generate.static_cache / generate.compile: not with a drafter (speculative "
            "decoding runs k + 1 tokens per forward through a dynamic cache); turn them off"
        )
    with _eager():
        return decode_speculative(model, ids, mask, cfg, rows, stops, pad_id, seeds, draft)


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
    row_seeds: Sequence[int] | None = None,
    draft: Drafter | None = None,
) -> Generation:
    """Continue each prompt (a list of token ids) until EOS, a stop string or max_new_tokens.

    Stop strings need the tokenizer. use_cache=False recomputes the whole sequence every step
    (the reference the cache is tested against); cfg.static_cache / cfg.compile decode through
    fixed shapes (the same tokens). Sampling draws from one generator seeded by cfg.seed, so a
    row's tokens depend on the batch it is in; with `row_seeds` (one int per prompt) each row
    samples from its own stream instead (`row_uniforms`), the same in any batch, on any number
    of processes.

    With `draft` (lmforge.speculative: model_drafter, ngram_drafter) the drafter proposes
    tokens that the model checks several at a time; the output has exactly the model's
    distribution: greedy and row-seeded sampling return the tokens plain decoding returns,
    sampling from the batch's generator uses modified rejection sampling. `stats` of the
    result counts forwards, proposals and acceptances.
    """
    cfg = cfg or GenerateConfig()
    _check_settings(cfg, tokenizer)
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    b, p = ids.shape
    _check_length(model, cfg, p)
    seeds = None
    if row_seeds is not None:
        if len(row_seeds) != b:
            raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {b} prompts")
        seeds = torch.tensor([int(x) % (1 << 63) for x in row_seeds], device=device)
    if draft is not None and not use_cache:
        raise ValueError("a drafter needs the KV cache (use_cache=True)")
    was_training = model.training
    model.eval()
    rows = _Rows.empty(b, cfg.max_new_tokens, pad_id, device)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    stops = _Stops(eos, cfg.stop_strings, tokenizer)
    try:
        if draft is None:
            stats = _decode_plain(model, ids, mask, cfg, rows, stops, pad_id, seeds, use_cache)
        else:
            stats = _decode_draft(model, ids, mask, cfg, rows, stops, pad_id, seeds, draft)
    finally:
        model.train(was_training)
    steps = int(rows.lengths.max())  # the step at which the last row stopped, or max_new_tokens
    return Generation(
        rows.tokens[:, :steps],
        rows.logprobs[:, :steps],
        rows.lengths,
        ids,
        mask,
        rows.stopped,
        stats,
    )
