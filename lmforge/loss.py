"""Cross-entropy over the vocabulary, fused with the output projection and chunked by rows.

For B·T rows of hidden states and a V×D output matrix, the plain path computes (B·T, V) logits in
fp32 and keeps them for backward: 3.2 GB at 16k tokens and V = 50k. The chunked path computes the
loss and its gradients chunk by chunk in the forward pass and keeps only the gradients of the
inputs (the size of the hidden states and the weight), so fp32 logits exist for one chunk at a time.

Shapes: N rows (tokens), D width, V vocabulary, C rows in a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.config import option
from lmforge.errors import ConfigError

IGNORE_INDEX = -100


@dataclass
class LossConfig:
    """Token-level cross-entropy options."""

    label_smoothing: float = option(0.0, "Label smoothing ε: target mass spread over the vocab.")
    z_loss: float = option(
        0.0, "Coefficient of the z-loss, coef·logsumexp², that keeps logits small (PaLM)."
    )
    chunk_size: int = option(
        1024, "Rows per chunk of the fused output+loss; 0 = plain path with full fp32 logits."
    )

    def validate(self, prefix: str = "loss") -> None:
        """Reject values outside their range, naming the key."""
        p = f"{prefix}." if prefix else ""
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"{p}label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.z_loss < 0:
            raise ConfigError(f"{p}z_loss: must be >= 0, got {self.z_loss}")
        if self.chunk_size < 0:
            raise ConfigError(f"{p}chunk_size: must be >= 0, got {self.chunk_size}")


def _row_losses(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float, z_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (C,) and log-sum-exp (C,) of fp32 logits (C, V); labels must be valid ids."""
    lse = torch.logsumexp(logits, dim=-1)  # (C,)
    target = logits.gather(1, labels[:, None]).squeeze(1)  # (C,)
    loss = lse - target
    if smoothing:
        # ε·(-mean_j log p_j) = ε·(lse - mean_j z_j), as torch's label_smoothing defines it.
        loss = (1.0 - smoothing) * loss + smoothing * (lse - logits.mean(dim=-1))
    if z_coef:
        loss = loss + z_coef * lse.square()
    return loss, lse


def _softmax_losses_(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float, z_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss (C,), log-sum-exp (C,) and softmax (C, V) of fp32 logits (C, V), which it
    overwrites with the softmax. One exponential pass serves both the loss and its gradient; the
    arithmetic is `torch.logsumexp`'s (max, exp of the difference, sum, log), so the loss is the
    plain path's."""
    target = logits.gather(1, labels[:, None]).squeeze(1)  # (C,)
    mean = logits.mean(dim=-1) if smoothing else None  # (C,)
    peak = logits.amax(dim=-1, keepdim=True)  # (C, 1)
    peak.masked_fill_(peak.abs() == float("inf"), 0.0)
    probs = logits.sub_(peak).exp_()  # (C, V): exp(z - max), in place
    sums = probs.sum(dim=-1)  # (C,)
    lse = sums.log().add_(peak.squeeze(1))  # (C,)
    probs.div_(sums[:, None])  # (C, V): the softmax
    loss = lse - target
    if mean is not None:
        loss = (1.0 - smoothing) * loss + smoothing * (lse - mean)
    if z_coef:
        loss = loss + z_coef * lse.square()
    return loss, lse, probs


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of per-token losses of (hidden @ weightᵀ); gradients computed during forward.

    Per chunk: one matmul to fp32 logits, one exponential pass (`_softmax_losses_`), the logit
    gradient built in place in that buffer, then two matmuls. Ignored rows are zeroed on the
    (C, D) side (their hidden rows and gradient rows), never by another pass over (C, V), and
    nothing waits for the device (no `.item()`, no data-dependent branch).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk: int,
        smoothing: float,
        z_coef: float,
    ) -> torch.Tensor:
        n, v = hidden.shape[0], weight.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # type: ignore[attr-defined]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None  # every row is written below
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        for s in range(0, n, chunk):
            h, y = hidden[s : s + chunk], labels[s : s + chunk]  # (C, D), (C,)
            valid = y != IGNORE_INDEX  # (C,)
            y = torch.where(valid, y, 0)
            logits = (h @ weight.t()).float()  # (C, V): the only fp32 logits alive
            loss, lse, g = _softmax_losses_(logits, y, smoothing, z_coef)  # g: softmax (C, V)
            total += loss.masked_fill(~valid, 0.0).sum()
            if not (want_h or want_w):
                continue
            # d loss / d logits = softmax·(1 + 2·z·lse) - (1-ε)·onehot - ε/V, built in place
            if z_coef:
                g.mul_((1.0 + 2.0 * z_coef * lse)[:, None])
            g[torch.arange(len(y), device=y.device), y] -= 1.0 - smoothing
            if smoothing:
                g.sub_(smoothing / v)
            g = g.to(weight.dtype)  # (C, V); rows of ignored labels are zeroed below
            keep = valid[:, None].to(weight.dtype)  # (C, 1)
            if grad_h is not None:
                grad_h[s : s + chunk] = (g @ weight) * keep  # (C, D)
            if grad_w is not None:
                hk = h * keep  # (C, D): an ignored row adds nothing to the weight's gradient
                if grad_w.dtype == g.dtype:
                    grad_w.addmm_(g.t(), hk)  # (V, D)
                else:
                    grad_w += (g.t() @ hk).float()  # (V, D)
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0),
            grad_w if grad_w is not None else torch.empty(0),
        )
        ctx.weight_dtype = weight.dtype  # type: ignore[attr-defined]
        return total

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors  # type: ignore[attr-defined]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # type: ignore[attr-defined]
        gh = grad_h * grad_out.to(grad_h.dtype) if want_h else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if want_w else None  # type: ignore[attr-defined]
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    cfg: LossConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of predicting labels (N,) from hidden (N, D) through weight (V, D).

    Returns (sum of token losses in fp32, number of labelled tokens); labels equal to -100 are
    ignored. The caller divides, so that gradient accumulation can normalise by a global count.
    """
    cfg = cfg or LossConfig()
    count = (labels != IGNORE_INDEX).sum()
    if cfg.chunk_size > 0:
        total = _ChunkedLinearCrossEntropy.apply(
            hidden, weight, labels, cfg.chunk_size, cfg.label_smoothing, cfg.z_loss
        )
        return total, count
    logits = F.linear(hidden, weight).float()  # (N, V)
    valid = labels != IGNORE_INDEX
    loss, _ = _row_losses(logits, torch.where(valid, labels, 0), cfg.label_smoothing, cfg.z_loss)
    return loss.masked_fill(~valid, 0.0).sum(), count
