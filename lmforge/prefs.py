"""Preference losses on summed response log-probabilities, all in fp32.

- `sequence_logprobs`: Σ_t log p(label_t) over labelled tokens, from logits or (chunked) from hidden
  states and the output weight without fp32 logits for every row at once.
- `token_logprobs_chunked`: the per-token log-probs (and entropies) behind the chunked sum, with
  a sampling temperature: what the RL stages read (lmforge.rollout).
- `dpo_loss`: DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
  Secretly a Reward Model", eq. 7), its conservative label-smoothed form cDPO (Mitchell 2023, "A
  note on DPO with noisy preferences and relationship to IPO"), and IPO (Azar et al. 2023, "A
  General Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17).
- `bradley_terry_loss`: the reward-model loss -log σ(s_chosen - s_rejected) (Bradley & Terry 1952;
  Ouyang et al. 2022, eq. 1, as one comparison per pair).

Every DPO variant sees the same inputs: log-probs SUMMED over response tokens, as the DPO and IPO
papers define π(y|x). TRL divides by the response length for IPO; here a caller who wants that
passes averaged log-probs (divide by `(labels != -100).sum(-1)`), and nothing else changes.

Shapes: B sequences (pairs), T length, V vocabulary, D width, N = B·T rows, C rows in a chunk.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from lmforge.loss import IGNORE_INDEX
from lmforge.model import GPT, LMHead

DPOKind = Literal["sigmoid", "ipo", "cdpo"]


# ------------------------------------------------------------------------ sequence log-probs


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ log p(label) per sequence: logits (B, T, V), labels (B, T) -> fp32 (B,).

    Labels are aligned with positions (the caller shifts, as for `GPT(labels=...)`); -100 is
    ignored. The softmax is in fp32 whatever the logits' dtype.
    """
    logits = logits.float()  # (B, T, V)
    valid = labels != IGNORE_INDEX  # (B, T)
    target = torch.where(valid, labels, 0)
    picked = logits.gather(-1, target[..., None]).squeeze(-1)  # (B, T)
    token_logp = picked - torch.logsumexp(logits, dim=-1)  # (B, T)
    return token_logp.masked_fill(~valid, 0.0).sum(-1)


# Rows of fp32 logits per chunk when the caller does not choose: 8 MiB of them at a time (64
# rows at a 32k vocabulary, 16 at 128k), so that a chunk's few (C, V) temporaries stay far below
# the model's own activations whatever the vocabulary (measured: docs/decisions.md).
CHUNK_BYTES = 8 * 2**20


def chunk_rows_for(vocab: int, budget: int | None = None) -> int:
    """Rows per chunk whose fp32 logits (C, V) fit in `budget` bytes (default CHUNK_BYTES,
    read at call time), at least 1."""
    return max(1, (budget or CHUNK_BYTES) // (4 * vocab))


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log p(label) and, when asked, the entropy per row of softmax(hidden @ weightᵀ / τ),
    chunk by chunk in both passes.

    Forward keeps no logits: only the inputs, the per-row log-sum-exp (N,) and entropy (N,).
    Backward recomputes one chunk of logits at a time. With z = logits / τ and q = softmax(z):
    d logp / dz = onehot(label) - q, and d H / dz = -q · (log q + H); both divided by τ.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk: int,
        temperature: float,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        out = torch.zeros(n, dtype=torch.float32, device=hidden.device)  # (N,)
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)  # (N,)
        ent = torch.zeros(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            z = F.linear(hidden[s : s + chunk], weight).float() / temperature  # (C, V) fp32
            y = labels[s : s + chunk]  # (C,)
            lse[s : s + chunk] = torch.logsumexp(z, dim=-1)
            logq = z - lse[s : s + chunk, None]  # (C, V)
            out[s : s + chunk] = logq.gather(1, y[:, None]).squeeze(1)
            if with_entropy:
                ent[s : s + chunk] = -(logq.exp() * logq).sum(-1)
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.chunk, ctx.temperature = chunk, temperature  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(*(() if with_entropy else (ent,)))
        ctx.set_materialize_grads(False)
        return out, ent

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_logp: torch.Tensor | None,
        grad_ent: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, labels, lse, ent = ctx.saved_tensors  # type: ignore[attr-defined]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # type: ignore[attr-defined]
        chunk: int = ctx.chunk  # type: ignore[attr-defined]
        tau: float = ctx.temperature  # type: ignore[attr-defined]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        if grad_logp is None and (grad_ent is None or not len(ent)):
            return grad_h, grad_w, None, None, None, None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]  # (C, D)
            logq = F.linear(h, weight).float() / tau - lse[s : s + chunk, None]  # (C, V)
            q = logq.exp()  # (C, V)
            g = torch.zeros_like(q)  # (C, V): d loss / dz
            if grad_logp is not None:
                gl = grad_logp[s : s + chunk].float()  # (C,)
                g -= q * gl[:, None]
                g[torch.arange(len(h), device=g.device), labels[s : s + chunk]] += gl
            if grad_ent is not None and len(ent):
                ge = grad_ent[s : s + chunk].float()  # (C,)
                g -= q * (logq + ent[s : s + chunk, None]) * ge[:, None]
            g /= tau  # d z / d logits = 1 / τ
            if grad_h is not None:
                grad_h[s : s + chunk] = (g @ weight.float()).to(hidden.dtype)  # (C, D)
            if grad_w is not None:
                grad_w += g.t() @ h.float()  # (V, D)
        gw = grad_w.to(weight.dtype) if grad_w is not None else None
        return grad_h, gw, None, None, None, None


def token_logprobs_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p(label) under softmax(hidden @ weightᵀ / temperature), and its entropy
    when asked, with fp32 logits for at most `chunk_size` rows at a time (forward and backward;
    0 = `chunk_rows_for` the vocabulary): hidden (B, T, D), weight (V, D) (the model's
    `output.weight`), labels (B, T) -> fp32 log-probs (B, T), 0 where the label is -100, and
    fp32 entropies (B, T) (every position; None without with_entropy). Differentiable in hidden
    and weight (both outputs); the logits are recomputed in backward.

    Under ZeRO-3 the weight is partitioned outside its module's forward: gather it around the
    forward and backward passes (deepspeed.zero.GatheredParameters), or use the plain function.
    """
    chunk = chunk_size or chunk_rows_for(weight.shape[0])
    if chunk <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    b, t, d = hidden.shape
    valid = labels != IGNORE_INDEX  # (B, T)
    rows, ent = _ChunkedTokenLogprobs.apply(
        hidden.reshape(b * t, d),  # (N, D)
        weight,
        torch.where(valid, labels, 0).reshape(b * t),  # (N,)
        chunk,
        float(temperature),
        with_entropy,
    )
    token_logp = rows.view(b, t).masked_fill(~valid, 0.0)  # (B, T)
    return token_logp, ent.view(b, t) if with_entropy else None


def sequence_logprobs_chunked(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """`sequence_logprobs` of the logits hidden @ weightᵀ, with fp32 logits for at most
    `chunk_size` rows at a time (forward and backward): hidden (B, T, D), weight (V, D) (the
    model's `output.weight`), labels (B, T) -> fp32 (B,). The sum of `token_logprobs_chunked`.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    token_logp, _ = token_logprobs_chunked(hidden, weight, labels, chunk_size=chunk_size)
    return token_logp.sum(-1)


def output_weight(model: Any) -> torch.Tensor | None:
    """The output-layer weight (V, D) that `model_token_logprobs` reads log-probs from in
    chunks, or None where the plain path must be taken: a model that is not an lmforge GPT
    (through an engine's `module`, or bare) or an output layer that is not the plain `LMHead`
    (e.g. an adapter put on it). Under ZeRO-3 the weight is a partition outside the head's own
    forward, which is where the chunks are computed. A tied weight is the embedding itself: the
    gradient from here adds to the embedding's as autograd adds any shared use."""
    module = getattr(model, "module", model)  # an engine wraps the model
    if not isinstance(module, GPT) or type(module.output) is not LMHead:
        return None
    return module.output.weight


def model_token_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`token_logprobs_chunked` of `model` (a GPT or an engine wrapping one) on input_ids
    (B, T) and aligned labels (B, T), run by the model's (or engine's) own forward so that the
    output layer computes them in its forward: ZeRO-3 gathers its weight there, for the
    backward pass too. None where `output_weight` says the chunked path cannot be taken: the
    caller computes from logits."""
    if output_weight(model) is None:
        return None
    out: tuple[torch.Tensor, torch.Tensor | None] = model(
        input_ids=input_ids,
        logprob_labels=labels,
        temperature=temperature,
        with_entropy=with_entropy,
    )
    return out


# ------------------------------------------------------------------------------- the losses


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    kind: DPOKind = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct preference loss from sequence log-probs (B,) of policy and reference.

    With h = (π_c - ref_c) - (π_r - ref_r), the difference of log-ratios, the per-pair loss is
    - sigmoid (DPO): -log σ(β·h)
    - cdpo (conservative DPO, labels flipped with probability ε = label_smoothing):
      -(1-ε)·log σ(β·h) - ε·log σ(-β·h)
    - ipo (IPO, eq. 17 with τ = β): (h - 1/(2β))²

    Returns (mean loss, metrics) with batch means of: reward_chosen β·(π_c - ref_c),
    reward_rejected β·(π_r - ref_r), margin (their difference), accuracy (chosen > rejected).
    Metrics are detached fp32 scalars.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if kind == "cdpo":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"cdpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    elif kind in ("sigmoid", "ipo"):
        if label_smoothing:
            raise ValueError(f"label_smoothing is for kind 'cdpo', not {kind!r}")
    else:
        raise ValueError(f"unknown DPO loss kind {kind!r}; choose sigmoid, ipo or cdpo")
    pi_c, pi_r = pi_chosen.float(), pi_rejected.float()
    ref_c, ref_r = ref_chosen.float().detach(), ref_rejected.float().detach()
    chosen_ratio, rejected_ratio = pi_c - ref_c, pi_r - ref_r  # (B,) log π/π_ref
    h = chosen_ratio - rejected_ratio  # (B,)
    if kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)).square()
    else:
        losses = -F.logsigmoid(beta * h)
        if kind == "cdpo" and label_smoothing:
            losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * h)
    with torch.no_grad():
        reward_c, reward_r = beta * chosen_ratio, beta * rejected_ratio  # (B,) implicit rewards
        metrics = {
            "reward_chosen": reward_c.mean(),
            "reward_rejected": reward_r.mean(),
            "margin": (reward_c - reward_r).mean(),
            "accuracy": (reward_c > reward_r).float().mean(),
        }
    return losses.mean(), metrics


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model loss on scores (B,): mean of -log σ(s_c - s_r), the negative log-likelihood of
    the preference under Bradley & Terry (1952), as in Ouyang et al. (2022).

    Returns (loss, accuracy): accuracy is the detached fraction of pairs with s_c > s_r.
    """
    diff = chosen_scores.float() - rejected_scores.float()  # (B,)
    loss = -F.logsigmoid(diff).mean()
    accuracy = (diff.detach() > 0).float().mean()
    return loss, accuracy
