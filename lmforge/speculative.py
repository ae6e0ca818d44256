"""Speculative decoding: a cheap drafter proposes tokens, the model checks them all in one forward.

Each round the model runs on the row's last token and the k proposed ones, (B, k + 1) tokens
through its KV cache, and keeps the longest accepted prefix of the proposals plus one token of
its own (the correction at the first rejection, or a bonus token when all were accepted). The
output has exactly the model's distribution:

- greedy decoding, and sampling with per-row seeds: the model's own pick at every position is
  computed exactly as plain decoding computes it (argmax, or the Gumbel-max trick on the row's
  counter-based noise for that output index), and a proposal is accepted when it equals that
  pick; the drafter draws its proposals with the same noise, so it often agrees. The tokens are
  the ones plain decoding returns, whatever the drafter, the batch or k.
- sampling from the batch's generator: modified rejection sampling (Leviathan et al. 2023;
  Chen et al. 2023): accept proposal d with probability min(1, p(d) / q(d)), and at the first
  rejection draw from norm(max(0, p - q)); a deterministic drafter (n-gram lookup) has q a point
  mass.

Rows accept different numbers of tokens: the rejected slots of a row become holes in the cache
(`KVCache.drop`), positions count real tokens only, and the cache is compacted when it fills up
(`KVCache.compact`), or after every round for ALiBi, whose biases count slots.

Shapes: B rows, k proposals per round, V vocabulary, P padded prompt length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.generate import (
    DecodeStats,
    GenerateConfig,
    _hit_stop_string,
    _pick_token,
    _Rows,
    _Stops,
    filter_logits,
    row_uniforms,
)
from lmforge.model import GPT, KVCache

# Adaptive k (draft_tokens 0): the first round's k, and its bounds.
ADAPTIVE_START, ADAPTIVE_MIN, ADAPTIVE_MAX = 4, 1, 12


@dataclass
class Proposal:
    """Tokens a drafter proposes for the next output positions of every row."""

    tokens: torch.Tensor  # (B, k) proposed tokens; columns past a row's count are ignored
    counts: torch.Tensor  # (B,) proposals per row, 0..k
    probs: torch.Tensor | None  # (B, k, V) the distribution each token was drawn from; None:
    # point masses (a deterministic drafter)


# How a drafter draws its j-th token of a round: pick(logits (B, V), j) -> (token (B,), the
# distribution it was drawn from (B, V), or None when the acceptance rule does not need it).
DraftPick = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor | None]]


class Drafter(Protocol):
    """Proposes up to k tokens per row each round; `generate(..., draft=drafter)` checks them.

    `k` is the most tokens proposed per round (0 = adaptive: generate chooses k each round from
    the acceptance so far). A drafter serves one `generate` call at a time: `start` gets the
    prompts, then every round `propose` gets the rows' tokens so far and `accepted` how many of
    its proposals each row kept.
    """

    k: int

    def start(self, ids: torch.Tensor, mask: torch.Tensor, capacity: int) -> None:
        """Begin a batch: left-padded prompts ids (B, P) with mask (B, P); `capacity` is the
        most cache slots a row may need (prompt, new tokens and room for holes)."""
        ...

    def propose(
        self, tokens: torch.Tensor, lengths: torch.Tensor, k: int, pick: DraftPick
    ) -> Proposal:
        """Up to k tokens per row that follow tokens[b, :lengths[b]] (B, N) (the generated
        tokens so far; the last one is not yet in any cache), drawn with `pick`."""
        ...

    def accepted(self, n: torch.Tensor) -> None:
        """How many of the last proposals each row (B,) kept."""
        ...


# ------------------------------------------------------------------------ a cache with holes


def cache_capacity(prompt_len: int, max_new: int, k: int, limit: int) -> int:
    """Cache slots per row for speculative decoding: the prompt, the new tokens, and room for
    holes (two rounds of k + 1, or an eighth more, so that compactions, each a copy of the
    cache, come at most every need / 8 holes), within the model's position limit."""
    need = prompt_len + max_new + 1
    return min(limit, need + max(2 * (k + 1), need // 8))


class CachedRows:
    """A model with a KV cache over a batch of rows whose rejected slots become holes.

    Positions count real tokens only (`real` (B,) per row), so a row computes what it would
    alone, holes and left padding included. With `exact_slots` (ALiBi, whose biases use slot
    distances) holes are compacted away after every round.
    """

    def __init__(self, model: GPT, batch: int, capacity: int) -> None:
        param = next(model.parameters())
        self.model = model
        self.cache = KVCache(model.cfg, batch, capacity, dtype=param.dtype, device=param.device)
        self.capacity = capacity
        self.exact_slots = model.cfg.position == "alibi"
        self.real = torch.zeros(batch, dtype=torch.long, device=param.device)  # (B,)
        self.forwards = 0
        self.compactions = 0
        self.start = 0  # the slot of the first token of the last feed

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run left-padded prompts ids (B, P) with mask (B, P) -> last logits (B, 1, V)."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): padding does not count
        self.forwards += 1
        logits = self.model(
            ids, attention_mask=mask, position_ids=positions, cache=self.cache, last_only=True
        )
        self.real = mask.sum(-1)
        return logits

    def room(self) -> int:
        """Slots left before the cache is full."""
        return self.capacity - self.cache.length

    def make_room(self, t: int) -> None:
        """Compact the cache when t more slots do not fit."""
        if self.cache.length + t > self.capacity:
            self.cache.compact()
            self.compactions += 1

    def feed(
        self, ids: torch.Tensor, valid: torch.Tensor | None = None, *, last_only: bool = False
    ) -> torch.Tensor:
        """Run ids (B, T) after each row's tokens so far -> logits (B, T, V) (or (B, 1, V));
        valid (B, T) False marks slots that are holes from the start."""
        t = ids.shape[1]
        self.make_room(t)
        flags = torch.ones_like(ids) if valid is None else valid.long()  # (B, T)
        positions = self.real[:, None] + flags.cumsum(1) - 1  # (B, T)
        # Proposals past a row's max_new_tokens are discarded; keep their positions in range.
        positions = positions.clamp(min=0, max=self.model.cfg.max_seq_len - 1)
        self.start = self.cache.length
        self.forwards += 1
        logits = self.model(
            ids,
            attention_mask=None if valid is None else flags,
            position_ids=positions,
            cache=self.cache,
            last_only=last_only,
        )
        self.real = self.real + flags.sum(1)
        return logits

    def keep(self, start: int, n: torch.Tensor) -> None:
        """Keep n[b] (B,) of the slots from `start` on in each row; the rest become holes."""
        holes = bool((n != n.max()).any())  # rows kept different numbers of slots
        self.cache.drop(start, n)
        self.real = self.cache.valid[:, : self.cache.length].sum(-1)
        if self.exact_slots and holes:
            self.cache.compact()
            self.compactions += 1


# ------------------------------------------------------------------------------ the drafters


class _ModelDrafter:
    """Proposals drawn from a (smaller) GPT with its own KV cache."""

    def __init__(self, model: GPT, k: int) -> None:
        self.model = model
        self.k = k
        self.rows: CachedRows | None = None
        self.seen = torch.zeros(0, dtype=torch.long)  # (B,) output tokens in the cache
        self.base = torch.zeros(0, dtype=torch.long)  # (B,) output index of the 1st proposal
        self.first = 0  # cache slot of the round's first fed token
        self.fed = 0  # tokens fed before the proposals this round
        self.round_k = 0
        self.forwards = 0

    def start(self, ids: torch.Tensor, mask: torch.Tensor, capacity: int) -> None:
        self.rows = CachedRows(self.model, ids.shape[0], min(capacity, self.model.cfg.max_seq_len))
        self.model.eval()
        self.rows.prefill(ids, mask)
        self.seen = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        self.forwards = 1

    def _catch_up(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Feed each row's output tokens not yet in the cache (the last one at least; rows
        behind by more are right-aligned, holes before) -> logits of the last (B, V)."""
        assert self.rows is not None
        width = max(1, int((lengths - self.seen).max()))
        idx = lengths[:, None] - width + torch.arange(width, device=lengths.device)  # (B, w)
        valid = idx >= self.seen[:, None]  # (B, w)
        chunk = tokens.gather(1, idx.clamp(min=0))  # (B, w)
        self.fed = width
        return self.rows.feed(chunk, None if bool(valid.all()) else valid, last_only=True)[:, -1]

    def propose(
        self, tokens: torch.Tensor, lengths: torch.Tensor, k: int, pick: DraftPick
    ) -> Proposal:
        assert self.rows is not None
        self.rows.make_room(int((lengths - self.seen).max()) + k)
        logits = self._catch_up(tokens, lengths)
        self.first = self.rows.start
        self.forwards += 1
        k = max(0, min(k, self.rows.room() + 1))  # the last proposal is never fed
        picked, dists = [], []
        for j in range(k):
            token, dist = pick(logits, j)
            picked.append(token)
            dists.append(dist)
            if j + 1 < k:
                logits = self.rows.feed(token[:, None], last_only=True)[:, -1]
                self.forwards += 1
        self.round_k, self.base = k, lengths.clone()
        if k == 0:
            empty = torch.zeros(lengths.shape[0], 0, dtype=torch.long, device=lengths.device)
            return Proposal(empty, torch.zeros_like(lengths), None)
        out = torch.stack(picked, dim=1)  # (B, k)
        probs = None if dists[0] is None else torch.stack(dists, dim=1)  # type: ignore[arg-type]
        return Proposal(out, torch.full_like(lengths, k), probs)

    def accepted(self, n: torch.Tensor) -> None:
        assert self.rows is not None
        # The cache holds this round's fed tokens and proposals 1..k-1: keep those accepted.
        in_cache = n.clamp(max=max(self.round_k - 1, 0))  # (B,)
        self.rows.keep(self.first, self.fed + in_cache)
        self.seen = self.base + in_cache


def model_drafter(model: GPT, k: int) -> Drafter:
    """A drafter that samples k tokens per round from `model` (a smaller GPT with the same
    vocabulary; k 0 = adaptive)."""
    if k < 0:
        raise ConfigError(f"generate.draft_tokens: must be >= 0, got {k}")
    return _ModelDrafter(model, k)


class _NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the row's last
    n (or fewer) tokens, in the prompt or the text so far."""

    def __init__(self, k: int, n: int) -> None:
        self.k, self.n = k, n
        self.history: list[list[int]] = []  # per row: prompt and generated tokens
        # Per row and gram length m: the m tokens before index j -> j (the latest j). Rows
        # with the same prompt (RL repeats them) share the prompt's grams; a row's own grams
        # (later, so looked up first) are its own.
        self.prompt_grams: list[list[dict[tuple[int, ...], int]]] = []
        self.own_grams: list[list[dict[tuple[int, ...], int]]] = []
        self.seen: list[int] = []
        self.device = torch.device("cpu")

    def _grams(
        self, seq: list[int], new: Sequence[int], grams: list[dict[tuple[int, ...], int]]
    ) -> None:
        """Append `new` to seq, indexing every gram that ends before each appended token."""
        for token in new:
            j = len(seq)
            for m in range(1, min(self.n, j) + 1):
                grams[m - 1][tuple(seq[j - m : j])] = j
            seq.append(int(token))

    def start(self, ids: torch.Tensor, mask: torch.Tensor, capacity: int) -> None:
        self.device = ids.device
        self.history, self.prompt_grams, self.own_grams = [], [], []
        built: dict[tuple[int, ...], list[dict[tuple[int, ...], int]]] = {}
        for r_ids, r_mask in zip(ids.tolist(), mask.tolist(), strict=True):
            prompt = [t for t, m in zip(r_ids, r_mask, strict=True) if m]
            key = tuple(prompt)
            if key not in built:
                built[key] = [{} for _ in range(self.n)]
                self._grams([], prompt, built[key])
            self.history.append(prompt)
            self.prompt_grams.append(built[key])
            self.own_grams.append([{} for _ in range(self.n)])
        self.seen = [0] * ids.shape[0]

    def _lookup(self, row: int, k: int) -> list[int]:
        seq = self.history[row]
        for m in range(min(self.n, len(seq)), 0, -1):
            gram = tuple(seq[-m:])
            j = self.own_grams[row][m - 1].get(gram, self.prompt_grams[row][m - 1].get(gram))
            if j is not None:
                return seq[j : j + k]
        return []

    def propose(
        self, tokens: torch.Tensor, lengths: torch.Tensor, k: int, pick: DraftPick
    ) -> Proposal:
        rows = tokens.tolist()
        out = []
        for row, n in enumerate(lengths.tolist()):
            self._grams(self.history[row], rows[row][self.seen[row] : n], self.own_grams[row])
            self.seen[row] = n
            out.append(self._lookup(row, k))
        width = max(len(p) for p in out)
        proposal = torch.tensor([p + [0] * (width - len(p)) for p in out], dtype=torch.long)
        proposal = proposal.view(len(out), width)  # (B, k'), also when nothing was found
        counts = torch.tensor([len(p) for p in out], dtype=torch.long)
        return Proposal(proposal.to(self.device), counts.to(self.device), None)

    def accepted(self, n: torch.Tensor) -> None:
        pass  # the next proposal reads the accepted tokens from the rows


def ngram_drafter(k: int, n: int = 3) -> Drafter:
    """A model-free drafter: prompt lookup over the prompt and the text so far, matching the
    last n tokens (fewer when n find nothing) and proposing up to k that followed (k 0 =
    adaptive)."""
    if k < 0:
        raise ConfigError(f"generate.draft_tokens: must be >= 0, got {k}")
    if n < 1:
        raise ConfigError(f"ngram drafter: n must be >= 1, got {n}")
    return _NgramDrafter(k, n)


def build_drafter(
    spec: str, k: int, model: GPT, load: Callable[[str], GPT] | None = None
) -> Drafter | None:
    """The drafter named by a `draft` setting: "" none, "ngram" prompt lookup, otherwise a
    checkpoint loaded by `load` (default: lmforge.checkpoint.load_checkpoint on the model's
    device and dtype), checked against `model`'s vocabulary."""
    if not spec:
        return None
    if spec == "ngram":
        return ngram_drafter(k)
    if load is None:
        from lmforge.checkpoint import load_checkpoint

        param = next(model.parameters())

        def load(path: str) -> GPT:
            return load_checkpoint(
                path, dtype=param.dtype, device=param.device, with_tokenizer=False
            )[0]

    try:
        draft = load(spec)
    except LmforgeError as err:
        raise type(err)(
            f"draft model: {err} (a draft is 'ngram' or a checkpoint with the model's tokenizer)"
        ) from err
    check_draft_model(draft, model, spec)
    return model_drafter(draft, k)


def check_draft_model(draft: GPT, model: GPT, where: str = "draft model") -> None:
    """Reject a draft model whose vocabulary differs from the model's."""
    if draft.cfg.vocab_size != model.cfg.vocab_size:
        raise ConfigError(
            f"generate.draft: {where} has a vocabulary of {draft.cfg.vocab_size} tokens, the "
            f"model {model.cfg.vocab_size}; a draft model needs the model's tokenizer"
        )


# ------------------------------------------------------------------------------ acceptance


def accept_mask(u: torch.Tensor, p_d: torch.Tensor, q_d: torch.Tensor) -> torch.Tensor:
    """Modified rejection sampling's test: accept with probability min(1, p(d) / q(d)), for
    uniforms u, p(d) and q(d) (B, k)."""
    return u * q_d < p_d


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution to draw from after a rejection: norm(max(0, p - q)) (B, V)."""
    r = (p - q).clamp(min=0)
    total = r.sum(-1, keepdim=True)
    # p == q leaves nothing (a rejection then has probability 0; floating point may still get
    # here): fall back to p itself.
    return torch.where(total > 0, r / total.clamp(min=1e-30), p)


def _gumbel(seeds: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """The Gumbel noise (B, V) plain decoding adds at output index[b] (B,) of each row."""
    return -torch.log(-torch.log(row_uniforms(seeds, index, vocab)))


def _scores(logits: torch.Tensor, cfg: GenerateConfig) -> torch.Tensor:
    """Temperature-scaled fp32 scores of logits (..., V), as plain decoding scales them."""
    scores = logits.float()
    if cfg.temperature > 0 and cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    return scores


def _filtered(scores: torch.Tensor, cfg: GenerateConfig) -> torch.Tensor:
    """filter_logits over scores (..., V) of any leading shape."""
    flat = filter_logits(scores.reshape(-1, scores.shape[-1]), cfg.top_k, cfg.top_p)
    return flat.view_as(scores)


def draft_pick(
    cfg: GenerateConfig, gen: torch.Generator, seeds: torch.Tensor | None, base: torch.Tensor
) -> DraftPick:
    """How a drafter draws under cfg: greedy argmax; with row seeds the Gumbel-max trick on the
    noise plain decoding uses at output index base[b] + j (B,), so the drafter agrees with the
    model whenever their distributions pick the same token; otherwise a sample from its
    filtered distribution q, which the acceptance test needs."""

    def pick(logits: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        scores = _scores(logits, cfg)  # (B, V)
        if cfg.temperature == 0:
            return scores.argmax(-1), None
        filtered = _filtered(scores, cfg)
        if seeds is not None:
            noise = _gumbel(seeds, base + j, scores.shape[-1])
            return (filtered.double() + noise).argmax(-1), None
        probs = torch.softmax(filtered, dim=-1)  # (B, V)
        return torch.multinomial(probs, 1, generator=gen).squeeze(1), probs

    return pick


@dataclass
class _Verdict:
    """The outcome of checking one round's proposals."""

    accepted: torch.Tensor  # (B,) leading proposals kept, a
    tokens: torch.Tensor  # (B, k + 1) the row's next tokens: columns 0..a are its output
    logprobs: torch.Tensor  # (B, k + 1) log p of those tokens, as plain decoding returns them


def _leading(ok: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of True in each row of ok (B, k) -> (B,)."""
    return ok.long().cumprod(dim=1).sum(dim=1)


def _match(
    scores: torch.Tensor,
    prop: Proposal,
    cfg: GenerateConfig,
    seeds: torch.Tensor | None,
    base: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy / row-seeded check: the model's own pick at every position (B, k + 1), as plain
    decoding picks it; a proposal is kept while it equals the pick."""
    if cfg.temperature == 0:
        picks = scores.argmax(-1)  # (B, k + 1)
    else:
        assert seeds is not None
        filtered = _filtered(scores, cfg).double()
        noise = [_gumbel(seeds, base + j, scores.shape[-1]) for j in range(scores.shape[1])]
        picks = (filtered + torch.stack(noise, dim=1)).argmax(-1)
    k = prop.tokens.shape[1]
    cols = torch.arange(k, device=scores.device)
    ok = (prop.tokens == picks[:, :k]) & (cols[None] < prop.counts[:, None])  # (B, k)
    return _leading(ok), picks


def _reject(
    scores: torch.Tensor, prop: Proposal, cfg: GenerateConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Modified rejection sampling over scores (B, k + 1, V) -> accepted (B,), tokens
    (B, k + 1) (the proposals, then the correction or bonus token at column a)."""
    b, width, vocab = scores.shape
    k = width - 1
    rows = torch.arange(b, device=scores.device)
    p = torch.softmax(_filtered(scores, cfg), dim=-1)  # (B, k + 1, V) the target distribution
    d = prop.tokens  # (B, k)
    p_d = p[:, :k].gather(-1, d[..., None]).squeeze(-1)  # (B, k)
    if prop.probs is None:
        q_d = torch.ones_like(p_d)  # point masses
    else:
        q_d = prop.probs.gather(-1, d[..., None]).squeeze(-1)
    u = torch.rand(b, k, generator=gen, device=scores.device)
    cols = torch.arange(k, device=scores.device)
    ok = accept_mask(u, p_d, q_d) & (cols[None] < prop.counts[:, None])
    a = _leading(ok)  # (B,)
    p_a = p[rows, a]  # (B, V)
    dist = p_a
    if k > 0:
        at = a.clamp(max=k - 1)
        if prop.probs is None:
            q_a = torch.nn.functional.one_hot(d[rows, at], vocab).to(p_a.dtype)
        else:
            q_a = prop.probs[rows, at]
        rejected = (a < prop.counts)[:, None]
        dist = torch.where(rejected, residual(p_a, q_a), p_a)
    nxt = torch.multinomial(dist, 1, generator=gen)  # (B, 1)
    tokens = torch.cat([d, torch.zeros_like(nxt)], dim=1).scatter(1, a[:, None], nxt)
    return a, tokens


def verify(
    logits: torch.Tensor,
    prop: Proposal,
    cfg: GenerateConfig,
    gen: torch.Generator,
    seeds: torch.Tensor | None,
    base: torch.Tensor,
) -> _Verdict:
    """Check proposals (B, k) against the model's logits (B, k + 1, V) of the positions after
    the row's last token and after each proposal; `base` (B,) is the output index of the
    first proposal."""
    scores = _scores(logits, cfg)  # (B, k + 1, V)
    if cfg.temperature == 0 or seeds is not None:
        a, tokens = _match(scores, prop, cfg, seeds, base)
    else:
        a, tokens = _reject(scores, prop, cfg, gen)
    # log p(token) under the temperature-scaled distribution before truncation, as plain.
    lse = torch.logsumexp(scores, dim=-1)  # (B, k + 1)
    logprobs = scores.gather(-1, tokens[..., None]).squeeze(-1) - lse
    return _Verdict(a, tokens, logprobs)


def _record(
    rows: _Rows, verdict: _Verdict, live: torch.Tensor, stops: _Stops, max_new: int
) -> torch.Tensor:
    """Append each live row's accepted proposals and next token to `rows`, one column at a
    time, stopping a row at EOS, a stop string or max_new tokens -> tokens recorded (B,)."""
    emit = torch.where(live, verdict.accepted + 1, 0)  # (B,)
    recorded = torch.zeros_like(emit)
    for j in range(verdict.tokens.shape[1]):
        m = (j < emit) & ~rows.finished & (rows.lengths < max_new)  # (B,)
        which = m.nonzero().squeeze(1)
        if which.numel() == 0:
            break
        token = verdict.tokens[:, j]  # (B,)
        at = rows.lengths[which]
        rows.tokens[which, at] = token[which]
        rows.logprobs[which, at] = verdict.logprobs[which, j]
        rows.lengths[which] += 1
        recorded[which] += 1
        done = m & torch.isin(token, stops.eos) if len(stops.eos) else torch.zeros_like(m)
        if stops.strings:
            for row in (m & ~done).nonzero().flatten().tolist():
                upto = int(rows.lengths[row])
                if _hit_stop_string(rows.tokens, row, upto, stops.tokenizer, stops.strings):
                    done[row] = True
        rows.stopped |= done & ~rows.finished
        rows.finished |= done
    return recorded


def _adapt(k: int, verdict: _Verdict, prop: Proposal, live: torch.Tensor) -> int:
    """Adaptive k: one more when every live row with proposals kept them all, one fewer when
    fewer than half the proposals were kept."""
    asked = live & (prop.counts > 0)
    if not bool(asked.any()):
        return k
    kept = verdict.accepted[asked]
    if bool((kept >= prop.counts[asked]).all()):
        return min(k + 1, ADAPTIVE_MAX)
    if 2 * int(kept.sum()) < int(prop.counts[asked].sum()):
        return max(k - 1, ADAPTIVE_MIN)
    return k


def _check_drafter(drafter: Drafter, model: GPT, need: int) -> None:
    """Reject a draft model with another vocabulary or too short a position limit."""
    draft = getattr(drafter, "model", None)
    if isinstance(draft, GPT):
        check_draft_model(draft, model)
        if draft.cfg.max_seq_len < need:
            raise ConfigError(
                f"generate.draft: the draft model's max_seq_len={draft.cfg.max_seq_len} is "
                f"shorter than prompt + max_new_tokens = {need}"
            )


def decode_speculative(
    model: GPT,
    ids: torch.Tensor,
    mask: torch.Tensor,
    cfg: GenerateConfig,
    rows: _Rows,
    stops: _Stops,
    pad_id: int,
    seeds: torch.Tensor | None,
    drafter: Drafter,
) -> DecodeStats:
    """Decode left-padded prompts ids (B, P) with mask (B, P) into `rows`, `drafter` proposing
    tokens that the model checks k at a time (see the module doc)."""
    b, p = ids.shape
    _check_drafter(drafter, model, p + cfg.max_new_tokens)
    k_fixed = drafter.k
    capacity = cache_capacity(p, cfg.max_new_tokens, k_fixed or ADAPTIVE_MAX, model.cfg.max_seq_len)
    target = CachedRows(model, b, capacity)
    gen = torch.Generator(device=ids.device).manual_seed(cfg.seed)
    token, lp = _pick_token(target.prefill(ids, mask), cfg, gen, seeds, 0)
    rows.record(0, token, lp, pad_id)
    stops.all_finished(rows, 0, token)  # marks rows that stop at their first token
    drafter.start(ids, mask, capacity)
    stats = DecodeStats()
    k = k_fixed or ADAPTIVE_START
    while True:
        live = ~rows.finished & (rows.lengths < cfg.max_new_tokens)  # (B,)
        if not bool(live.any()):
            break
        need = int((cfg.max_new_tokens - rows.lengths)[live].max())
        k_round = max(0, min(k, need - 1))
        target.make_room(k_round + 1)
        k_round = max(0, min(k_round, target.room() - 1))
        base = rows.lengths.clone()  # (B,) output index of the first proposal
        prop = _propose(drafter, rows, base, k_round, draft_pick(cfg, gen, seeds, base))
        last = rows.tokens.gather(1, (base - 1)[:, None])  # (B, 1) not yet in the cache
        logits = target.feed(torch.cat([last, prop.tokens], dim=1))  # (B, k + 1, V)
        verdict = verify(logits, prop, cfg, gen, seeds, base)
        recorded = _record(rows, verdict, live, stops, cfg.max_new_tokens)
        # The cache holds the last token and the proposals: keep the recorded ones' slots.
        target.keep(target.start, recorded)
        if k_round > 0:
            # Proposals that made it into the output; none for rows already done (their
            # drafter cache must not grow).
            kept = torch.minimum(verdict.accepted, recorded)
            drafter.accepted(torch.where(live, kept, 0))
        stats.rounds += 1
        stats.proposed += int(prop.counts[live].sum())
        stats.accepted += int(verdict.accepted[live].sum())
        if not k_fixed:
            k = _adapt(k, verdict, prop, live)
    stats.forwards = target.forwards
    stats.draft_forwards = int(getattr(drafter, "forwards", 0))
    stats.compactions = target.compactions
    return stats


def _propose(
    drafter: Drafter, rows: _Rows, base: torch.Tensor, k: int, pick: DraftPick
) -> Proposal:
    """The drafter's proposals for this round (none when k is 0)."""
    if k == 0:
        empty = torch.zeros(base.shape[0], 0, dtype=torch.long, device=base.device)
        return Proposal(empty, torch.zeros_like(base), None)
    return drafter.propose(rows.tokens, base, k, pick)
