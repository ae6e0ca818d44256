"""Reinforcement learning for PPO and GRPO: pure tensor functions and small state holders.

Everything works on per-token tensors of a batch of responses, masked by a response mask (B, T)
that is 1 (or True) for real response tokens and 0 for padding (prompt positions are not in
these tensors). A masked position never changes a result: inputs there may hold anything, even
NaN or inf, and outputs and gradients there are 0.

- `masked_mean`, `masked_var`, `masked_whiten`: statistics over the valid tokens only.
- `kl_estimate`: per-token estimators k1, k2, k3 of KL(π‖π_ref) from tokens sampled from π
  (J. Schulman, "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html).
- `per_token_rewards`: the RLHF reward: -β·KL per token plus the sequence score at the last token
  (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", eq. 2; Ouyang et al.
  2022, "Training language models to follow instructions with human feedback", eq. 2).
- `gae`: generalized advantage estimation (Schulman et al. 2015, "High-Dimensional Continuous
  Control Using Generalized Advantage Estimation", eq. 16).
- `ppo_policy_loss`, `ppo_value_loss`: the clipped surrogate objective (Schulman et al. 2017,
  "Proximal Policy Optimization Algorithms", eq. 7) and the clipped value loss of the PPO
  baselines implementation (and of Ziegler et al. 2019's lm-human-preferences).
- `entropy_from_logits`: mean entropy of the policy over valid tokens.
- `group_advantages`, `grpo_loss`: GRPO (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of
  Mathematical Reasoning in Open Language Models", §4.1, eq. 3 and 4), with the mean-only
  advantages of Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
  Perspective").
- `AdaptiveKLController`, `FixedKLController`: the KL coefficient β (Ziegler et al. 2019, §2.2).
- `RunningMoments`, `clip_rewards`: reward normalisation and clipping.

Losses and estimates are computed in fp32 whatever the inputs' dtype; metrics are detached fp32
scalars. Shapes: B sequences, T response length, V vocabulary, N samples, G group size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

KLKind = Literal["k1", "k2", "k3"]
WHITEN_EPS = 1e-8  # added to the variance before the square root, as in PPO implementations


# -------------------------------------------------------------------------- masked statistics


def _valid(mask: torch.Tensor) -> torch.Tensor:
    """The mask as booleans."""
    return mask if mask.dtype == torch.bool else mask != 0


def _kept(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x in fp32 with masked positions set to 0 BEFORE any arithmetic, so that garbage there
    (NaN, inf, a huge log-ratio) can reach neither a result nor a gradient (0·inf is NaN)."""
    return torch.where(valid, x.float(), 0.0)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x over positions where mask is set (all of them, or along `dim`), in fp32."""
    kept = _kept(x, _valid(mask))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is set, in fp32: a scalar, or reduced along `dim`.

    A row (or a whole mask) with no valid position gives 0, not NaN.
    """
    count = _valid(mask).float()
    count = count.sum() if dim is None else count.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance (divided by the count, not count - 1) of x over the valid positions."""
    x = _kept(x, _valid(mask))
    mean = masked_mean(x, mask)
    return masked_mean((x - mean).square(), mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) with mean and variance over the valid positions (fp32).

    The PPO advantage normalisation. With `shift_mean=False` the mean is added back, so only the
    scale changes (what one wants for rewards whose sign means something). Padded positions are 0.
    """
    x = _kept(x, _valid(mask))
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return torch.where(_valid(mask), out, 0.0)


# ------------------------------------------------------------------------------ KL and rewards


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from tokens sampled from π: (B, T) -> fp32 (B, T).

    With log r = ref_logp - logp (r = π_ref/π at the sampled token), Schulman (2020) gives
    - k1 = -log r = logp - ref_logp: unbiased, high variance, negative for some tokens;
    - k2 = ½(log r)²: biased (close to KL when π ≈ π_ref), low variance, ≥ 0;
    - k3 = (r - 1) - log r: unbiased, low variance, ≥ 0 and 0 exactly when logp == ref_logp.

    Elementwise: mask the result yourself (`per_token_rewards` and `grpo_loss` do).
    """
    log_r = ref_logp.float() - logp.float()  # (B, T)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r.square()
    if kind == "k3":
        return torch.expm1(log_r) - log_r  # expm1: exact near r = 1, where k3 ≈ ½(log r)²
    raise ValueError(f"unknown KL estimator {kind!r}; choose k1, k2 or k3")


def _last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid position of each row: (B, T) -> (B,) int64."""
    valid = _valid(mask)
    if not bool(valid.any(-1).all()):
        raise ValueError("every response needs at least one valid token in the mask")
    positions = torch.arange(mask.shape[-1], device=mask.device)  # (T,)
    return torch.where(valid, positions, -1).amax(-1)  # (B,)


@torch.no_grad()
def per_token_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: KLKind = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLHF per-token rewards: -β·KL(π‖π_ref) at every response token, plus the sequence score.

    R(x, y) = r(x, y) - β·log(π(y|x)/π_ref(y|x)) (Ziegler et al. 2019 eq. 2; Ouyang et al. 2022
    eq. 2), with the log-ratio spread over tokens as a per-token estimate (k1 is the papers') and
    the score r (B,) added at the last valid token of each row. Inputs: scores (B,), logp and
    ref_logp (B, T) of the sampled tokens, mask (B, T).

    Returns (rewards, kl), both fp32 (B, T), detached, 0 at padded positions; kl is the unscaled
    per-token estimate (for logging and for the adaptive controller).
    """
    valid = _valid(mask)
    kl = _kept(kl_estimate(_kept(logp, valid), _kept(ref_logp, valid), kind), valid)  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    last = _last_valid_index(mask)  # (B,)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(device=rewards.device, dtype=torch.float32)
    return rewards, kl


# ------------------------------------------------------------------------------------ GAE


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the valid tokens: (B, T) each -> (advantages, returns).

    δ_t = r_t + γ·V_{t+1} - V_t and A_t = δ_t + γλ·A_{t+1} (Schulman et al. 2015, eq. 16), where
    t+1 is the next VALID token: masked positions are skipped, not treated as zero-reward steps,
    so padding anywhere in a row (trailing, leading or in the middle) changes nothing. After the
    last valid token the episode has ended: V = 0 there (no bootstrap). Returns = A + V, the
    value targets (the TD(λ) return). Both fp32, detached, 0 at padded positions.
    """
    valid = _valid(mask)
    r, v = _kept(rewards, valid), _kept(values, valid)  # (B, T) each
    advantages = torch.zeros_like(r)  # (B, T)
    next_value = torch.zeros_like(r[:, 0])  # (B,): V of the next valid token; 0 past the end
    next_adv = torch.zeros_like(r[:, 0])  # (B,): A of the next valid token
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]  # (B,)
        adv = delta + gamma * lam * next_adv  # (B,)
        m = valid[:, t]
        advantages[:, t] = torch.where(m, adv, 0.0)
        next_adv = torch.where(m, adv, next_adv)  # a masked position passes its successor on
        next_value = torch.where(m, v[:, t], next_value)
    returns = torch.where(valid, advantages + v, 0.0)
    return advantages, returns


# --------------------------------------------------------------------------------- PPO losses


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), mean over all valid tokens.

    With ratio ρ = π/π_old = exp(logp - old_logp) per token, the loss is
    max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)): the ratio's gradient is cut only where it left [1-ε, 1+ε]
    in the direction the advantage favours (ρ > 1+ε with A > 0, ρ < 1-ε with A < 0).
    Inputs (B, T); advantages are constants (detached here).

    Metrics: clip_fraction, the share of valid tokens where the clipped term is the larger
    (gradient cut), and approx_kl, the k3 estimate of KL(π_old‖π) from tokens sampled from π_old:
    (ρ - 1) - log ρ (Schulman 2020), ≥ 0.
    """
    if clip <= 0:
        raise ValueError(f"clip must be positive, got {clip}")
    valid = _valid(mask)
    log_ratio = _kept(logp, valid) - _kept(old_logp.detach(), valid)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = _kept(advantages.detach(), valid)  # (B, T)
    unclipped = -adv * ratio  # (B, T)
    clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ½·max((V - R)², (V_old + clip(V - V_old, -ε, ε) - R)²), token mean.

    The value head may not move further than ε from the value that collected the batch, as in
    the PPO baselines implementation and Ziegler et al. (2019)'s code. Inputs (B, T).

    Metric: value_clip_fraction, the share of valid tokens where the clipped error is the larger
    (gradient cut).
    """
    if clip <= 0:
        raise ValueError(f"clip must be positive, got {clip}")
    valid = _valid(mask)
    v = _kept(values, valid)  # (B, T)
    v_old, target = _kept(old_values.detach(), valid), _kept(returns.detach(), valid)  # (B, T)
    v_clipped = v_old + (v - v_old).clamp(-clip, clip)  # (B, T)
    err, err_clipped = (v - target).square(), (v_clipped - target).square()  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        metrics = {"value_clip_fraction": masked_mean((err_clipped > err).float(), mask)}
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens of the entropy -Σ_v p_v·log p_v of softmax(logits) (B, T, V), fp32.

    Logits of -inf (a vocabulary entry ruled out) contribute 0 and give no NaN gradient.
    """
    logits = torch.where(_valid(mask)[..., None], logits.float(), 0.0)  # (B, T, V)
    logp = torch.log_softmax(logits, dim=-1)  # (B, T, V)
    finite_logp = torch.where(torch.isfinite(logp), logp, 0.0)  # 0·(-inf) would be NaN
    entropy = -(logp.exp() * finite_logp).sum(-1)  # (B, T)
    return masked_mean(entropy, mask)


# ------------------------------------------------------------------------------------- GRPO


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True
) -> torch.Tensor:
    """GRPO outcome advantages: (N,) rewards of N/G groups of G consecutive samples -> fp32 (N,).

    Â_i = (r_i - mean(group)) / (std(group) + eps) (Shao et al. 2024, §4.1.2), std with Bessel's
    correction (as TRL, verl and OpenRLHF compute it). `scale=False` keeps only the mean-centring
    (Dr. GRPO, Liu et al. 2025: dividing by the std over-weights groups that are almost all right
    or all wrong). A group whose rewards are all equal gives exact zeros: it carries no signal.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (samples are compared), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
            f"got shape {tuple(rewards.shape)}"
        )
    r = rewards.float().view(-1, group_size)  # (N/G, G)
    centred = r - r.mean(-1, keepdim=True)  # (N/G, G)
    if scale:
        centred = centred / (r.std(-1, keepdim=True) + eps)
    constant = r.amax(-1, keepdim=True) == r.amin(-1, keepdim=True)  # (N/G, 1)
    return torch.where(constant, 0.0, centred).view(-1)  # (N,)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss (Shao et al. 2024, eq. 3): the negated objective, to minimise.

    Per token: -min(ρ·Â, clip(ρ, 1-ε, 1+ε)·Â) + β·k3, with ρ = exp(logp - old_logp), Â the
    sequence advantage (B,) broadcast over its tokens, and k3 = π_ref/π - log(π_ref/π) - 1 the
    paper's unbiased KL estimate (eq. 4). As in the paper, each sequence's tokens are averaged
    (1/|o_i|), then the sequences. With β = 0 no reference is needed: pass ref_logp=None.
    Inputs (B, T) except advantages (B,).

    Metrics: clip_fraction (share of valid tokens whose ratio gradient is cut), and, when a
    reference is given, kl: the KL term aggregated like the loss (loss = policy part + β·kl).
    """
    if clip <= 0:
        raise ValueError(f"clip must be positive, got {clip}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if ref_logp is None and beta != 0:
        raise ValueError(f"beta={beta} needs ref_logp; pass the reference log-probs or beta=0")
    valid = _valid(mask)
    logp = _kept(logp, valid)  # (B, T)
    log_ratio = logp - _kept(old_logp.detach(), valid)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = advantages.float().detach()[:, None]  # (B, 1): one advantage per sequence
    unclipped = -adv * ratio  # (B, T)
    clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)  # (B, T)
    per_token = torch.maximum(unclipped, clipped)  # (B, T)
    kl = None
    if ref_logp is not None:
        kl = kl_estimate(logp, _kept(ref_logp.detach(), valid), "k3")  # (B, T), through logp
        per_token = per_token + beta * kl
    loss = masked_mean(per_token, mask, dim=-1).mean()  # token mean per sequence, then batch
    with torch.no_grad():
        metrics = {"clip_fraction": masked_mean((clipped > unclipped).float(), mask)}
        if kl is not None:
            metrics["kl"] = masked_mean(kl, mask, dim=-1).mean()
    return loss, metrics


# ------------------------------------------------------------------------- KL coefficient β


class AdaptiveKLController:
    """β that tracks a target KL (Ziegler et al. 2019, §2.2): β ← β·(1 + K_β·e), with
    e = clip(KL/KL_target - 1, -0.2, 0.2).

    The paper fixes K_β = 0.1 per step; its code (openai/lm-human-preferences) and TRL use
    K_β = n_steps / horizon, so the rate does not depend on the batch size: `n_steps` and
    `horizon` count in the same unit, samples (episodes) there, with horizon 10,000. A KL above
    the target raises β, below it lowers β, by at most 20% of n_steps/horizon per update.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef <= 0:
            raise ValueError(f"init_kl_coef must be positive, got {init_kl_coef}")
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β toward the value that would give the target KL, from a measured `current_kl`."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """The current β (the rest comes from the config)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore β from `state_dict()`."""
        self.value = float(state["value"])


class FixedKLController:
    """A constant β with the `AdaptiveKLController` interface."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing: β stays fixed."""

    def state_dict(self) -> dict[str, float]:
        """β, for symmetry with the adaptive controller."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore β from `state_dict()`."""
        self.value = float(state["value"])


# --------------------------------------------------------------------- reward normalisation


class RunningMoments:
    """Running mean and (population) standard deviation of every value seen, for normalising
    rewards across batches.

    Each batch is merged with Chan et al.'s parallel form of Welford's update (Chan, Golub &
    LeVeque 1979), in float64: count n, mean μ and M2 = Σ(x - μ)². Feed it the same (gathered)
    values on every rank and the statistics stay identical everywhere.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        """Population variance (M2 / n), as numpy's default; 0 before any value."""
        return self.m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        """Population standard deviation; 0 before any value."""
        return math.sqrt(self.var)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge all values of `x` (any shape) into the statistics."""
        values = x.detach().double().flatten()  # (n,)
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = (values - batch_mean).square().sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    def normalise(self, x: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """(x - μ) / σ (or x / σ with `shift_mean=False`), in x's dtype.

        Until two values have been seen σ counts as 1, so an early batch is not blown up.
        """
        std = max(self.std, WHITEN_EPS) if self.count >= 2 else 1.0
        return ((x.double() - (self.mean if shift_mean else 0.0)) / std).to(x.dtype)

    def state_dict(self) -> dict[str, float]:
        """Count, mean and M2: everything needed to resume."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from `state_dict()`."""
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])


def clip_rewards(x: torch.Tensor, limit: float) -> torch.Tensor:
    """Rewards clamped to [-limit, limit] (after normalisation, a guard against outliers)."""
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    return x.clamp(-limit, limit)
