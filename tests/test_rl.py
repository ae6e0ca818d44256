"""RL tensor functions against values worked out by hand, masks that change nothing, clipping
that engages only where it should, and the KL controllers and running moments."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lmforge.rl import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clip_rewards,
    entropy_from_logits,
    gae,
    group_advantages,
    grpo_loss,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)

LN2 = math.log(2.0)
NAN = float("nan")


def t(*rows: list[float]) -> torch.Tensor:
    """A float32 (B, T) tensor from rows."""
    return torch.tensor(list(rows), dtype=torch.float32)


def close(
    a: torch.Tensor | float, b: torch.Tensor | float | list[float], tol: float = 1e-6
) -> bool:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and torch.allclose(a, b, atol=tol, rtol=0)


# ------------------------------------------------------------------------ masked statistics


def test_masked_mean_over_all_and_along_a_dim() -> None:
    x = t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    mask = t([1, 1, 0], [1, 0, 0])
    assert close(masked_mean(x, mask), (1 + 2 + 4) / 3)
    assert close(masked_mean(x, mask, dim=-1), [(1 + 2) / 2, 4.0])
    assert close(masked_mean(x, mask.bool(), dim=0), [(1 + 4) / 2, 2.0, 0.0])  # empty column: 0


def test_masked_statistics_ignore_anything_under_the_mask() -> None:
    mask = t([1, 1, 0])
    clean, dirty = t([2.0, 6.0, 0.0]), t([2.0, 6.0, NAN])
    assert close(masked_mean(dirty, mask), 4.0)
    assert close(masked_var(dirty, mask), ((2 - 4) ** 2 + (6 - 4) ** 2) / 2)  # population: 4
    assert torch.equal(masked_whiten(dirty, mask), masked_whiten(clean, mask))
    assert close(masked_mean(t([1.0]), t([0])), 0.0)  # nothing valid: 0, not NaN


def test_masked_whiten_by_hand() -> None:
    x, mask = t([2.0, 6.0, 99.0]), t([1, 1, 0])  # valid mean 4, variance 4, std 2
    assert close(masked_whiten(x, mask), [[(2 - 4) / 2, (6 - 4) / 2, 0.0]])
    assert close(masked_whiten(x, mask, shift_mean=False), [[(2 - 4) / 2 + 4, (6 - 4) / 2 + 4, 0]])


# --------------------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand() -> None:
    # Token 0: π = 0.5, π_ref = 0.25, so r = π_ref/π = 1/2. Token 1: π = 0.25, π_ref = 0.5, r = 2.
    logp = torch.log(t([0.5, 0.25]))
    ref = torch.log(t([0.25, 0.5]))
    assert close(kl_estimate(logp, ref, "k1"), [[LN2, -LN2]])
    assert close(kl_estimate(logp, ref, "k2"), [[0.5 * LN2**2, 0.5 * LN2**2]])
    assert close(kl_estimate(logp, ref, "k3"), [[(0.5 - 1) + LN2, (2 - 1) - LN2]])
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, "k4")  # type: ignore[arg-type]


def test_k1_and_k3_are_unbiased_and_k3_nonnegative() -> None:
    # Over a two-token vocabulary π = (1/2, 1/2), π_ref = (1/4, 3/4), the expectation under π of
    # k1 and k3 is KL(π‖π_ref) = ½·log(0.5/0.25) + ½·log(0.5/0.75).
    p, q = t([0.5, 0.5]), t([0.25, 0.75])
    exact = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    for kind in ("k1", "k3"):
        assert close((p * kl_estimate(p.log(), q.log(), kind)).sum(), exact)  # type: ignore[arg-type]
    logp, ref = torch.randn(4, 50), torch.randn(4, 50)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k2") >= 0).all()
    assert torch.equal(kl_estimate(logp, logp.clone(), "k3"), torch.zeros(4, 50))


def test_per_token_rewards_by_hand() -> None:
    # k1 per token = logp - ref: row 0 (0.1, 0.2, 0.3), row 1 (0.5, then padding).
    ref = t([-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0])
    logp = ref + t([0.1, 0.2, 0.3], [0.5, NAN, 7.0])
    mask = t([1, 1, 1], [1, 0, 0])
    rewards, kl = per_token_rewards(torch.tensor([1.0, 2.0]), logp, ref, mask, kl_coef=0.5)
    assert close(kl, [[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    assert close(rewards, [[-0.5 * 0.1, -0.5 * 0.2, -0.5 * 0.3 + 1.0], [-0.5 * 0.5 + 2.0, 0, 0]])
    assert not rewards.requires_grad


def test_per_token_rewards_score_goes_to_the_last_valid_token() -> None:
    logp = ref = torch.zeros(2, 4)
    mask = t([1, 1, 0, 1], [0, 1, 1, 0])  # a hole in row 0, left and right padding in row 1
    rewards, _ = per_token_rewards(torch.tensor([3.0, 4.0]), logp, ref, mask, 0.1, "k3")
    assert close(rewards, [[0, 0, 0, 3.0], [0, 0, 4.0, 0]])
    with pytest.raises(ValueError, match="at least one valid token"):
        per_token_rewards(torch.tensor([1.0, 1.0]), logp[:, :2], ref[:, :2], t([1, 0], [0, 0]), 0.1)


# -------------------------------------------------------------------------------------- GAE


def test_gae_by_hand() -> None:
    gamma, lam = 0.9, 0.8
    rewards, values = t([0.0, 0.0, 1.0]), t([0.5, 0.6, 0.7])
    # Backwards from the last token, V = 0 after it:
    delta2 = 1.0 + 0.9 * 0.0 - 0.7  # 0.3
    a2 = delta2
    delta1 = 0.0 + 0.9 * 0.7 - 0.6  # 0.03
    a1 = delta1 + 0.9 * 0.8 * a2  # 0.246
    delta0 = 0.0 + 0.9 * 0.6 - 0.5  # 0.04
    a0 = delta0 + 0.9 * 0.8 * a1  # 0.21712
    adv, ret = gae(rewards, values, t([1, 1, 1]), gamma, lam)
    assert close(adv, [[a0, a1, a2]])
    assert close(ret, [[a0 + 0.5, a1 + 0.6, a2 + 0.7]])
    # γ = λ = 1 is Monte Carlo: every return is the sum of the rewards, 1.
    adv, ret = gae(rewards, values, t([1, 1, 1]), 1.0, 1.0)
    assert close(adv, [[1 - 0.5, 1 - 0.6, 1 - 0.7]])
    assert close(ret, [[1.0, 1.0, 1.0]])


def test_gae_skips_padding_wherever_it_is() -> None:
    rewards, values = t([0.0, 0.0, 1.0]), t([0.5, 0.6, 0.7])
    adv, ret = gae(rewards, values, t([1, 1, 1]), 0.9, 0.8)
    # The same three tokens with garbage in between, before and after.
    padded_r = t([9.0, 0.0, NAN, 0.0, 5.0, 1.0, 3.0])
    padded_v = t([NAN, 0.5, 4.0, 0.6, -2.0, 0.7, 8.0])
    mask = t([0, 1, 0, 1, 0, 1, 0])
    padded_adv, padded_ret = gae(padded_r, padded_v, mask, 0.9, 0.8)
    keep = mask[0].bool()
    assert torch.equal(padded_adv[0, keep], adv[0]) and torch.equal(padded_ret[0, keep], ret[0])
    assert (padded_adv[0, ~keep] == 0).all() and (padded_ret[0, ~keep] == 0).all()
    # A shorter row in the batch ends where its mask ends: its last token bootstraps from 0.
    batch_r, batch_v = t([0.0, 0.0, 1.0], [2.0, 0.0, 0.0]), t([0.5, 0.6, 0.7], [1.5, 9.0, 9.0])
    both, _ = gae(batch_r, batch_v, t([1, 1, 1], [1, 0, 0]), 0.9, 0.8)
    assert torch.equal(both[0], adv[0]) and close(both[1], [2.0 - 1.5, 0.0, 0.0])


# ------------------------------------------------------------------------------- PPO losses

# Five tokens, ε = 0.2: (ratio, advantage) and whether the clipped term is the larger.
RATIOS = [1.5, 0.5, 0.5, 1.5, 1.1]
ADVANTAGES = [1.0, 1.0, -1.0, -1.0, 2.0]
# 1.5 with A > 0: above 1+ε in the favoured direction -> clipped, term -1.2·1 = -1.2
# 0.5 with A > 0: below 1-ε, but moving away from the favoured side -> kept, -0.5
# 0.5 with A < 0: below 1-ε in the favoured direction -> clipped, -0.8·(-1) = 0.8
# 1.5 with A < 0: above 1+ε, against the favoured side -> kept, -1.5·(-1) = 1.5
# 1.1 inside [0.8, 1.2] -> kept, -1.1·2 = -2.2
TERMS = [-1.2, -0.5, 0.8, 1.5, -2.2]
CLIPPED = [True, False, True, False, False]


def test_ppo_policy_loss_by_hand() -> None:
    old = t([-1.0, -2.0, -0.5, -3.0, -1.5])
    logp = (old + torch.log(t(RATIOS))).requires_grad_(True)
    loss, metrics = ppo_policy_loss(logp, old, t(ADVANTAGES), torch.ones(1, 5), clip=0.2)
    assert close(loss, sum(TERMS) / 5)  # -0.32
    assert close(metrics["clip_fraction"], 2 / 5)
    approx_kl = sum((r - 1) - math.log(r) for r in RATIOS) / 5
    assert close(metrics["approx_kl"], approx_kl)
    loss.backward()
    # d/d logp of -A·ρ is -A·ρ; a clipped token gets no gradient.
    expected = [
        0.0 if c else -a * r / 5 for r, a, c in zip(RATIOS, ADVANTAGES, CLIPPED, strict=True)
    ]
    assert logp.grad is not None and close(logp.grad, [expected])


def test_ppo_clipping_engages_exactly_outside_the_range() -> None:
    old = torch.zeros(1, 4)
    logp = torch.log(t([1.19, 1.21, 0.81, 0.79]))
    for adv, clipped in ((1.0, [0, 1, 0, 0]), (-1.0, [0, 0, 0, 1])):
        for i, want in enumerate(clipped):
            mask = torch.zeros(1, 4)
            mask[0, i] = 1
            _, m = ppo_policy_loss(logp, old, torch.full((1, 4), adv), mask, clip=0.2)
            assert m["clip_fraction"].item() == want, (adv, i)


def test_ppo_policy_loss_ignores_padding() -> None:
    old = t([-1.0, -2.0, -0.5, -3.0, -1.5, -500.0])
    logp = old + torch.log(t([*RATIOS, 1.0]))
    logp[0, 5] = 0.0  # padding: a log-ratio of 500, whose exp overflows to inf
    logp.requires_grad_(True)
    adv = t([*ADVANTAGES, NAN])
    loss, metrics = ppo_policy_loss(logp, old, adv, t([1, 1, 1, 1, 1, 0]), clip=0.2)
    assert close(loss, sum(TERMS) / 5) and close(metrics["clip_fraction"], 2 / 5)
    assert close(metrics["approx_kl"], sum((r - 1) - math.log(r) for r in RATIOS) / 5)
    loss.backward()
    assert logp.grad is not None and torch.isfinite(logp.grad).all() and logp.grad[0, 5] == 0


def test_ppo_value_loss_by_hand() -> None:
    old_v = t([1.0, 1.0, 1.0, 1.0, 0.0])
    v = t([1.5, 1.1, 0.5, 1.5, NAN]).requires_grad_(True)
    target = t([2.0, 0.0, 0.0, 1.0, 5.0])
    # clip 0.2: V_clipped = (1.2, 1.1, 0.8, 1.2)
    # token 0: (1.5-2)² = 0.25, (1.2-2)² = 0.64 -> 0.64, clipped (moved toward the target too far)
    # token 1: inside the range: (1.1-0)² = 1.21 both ways -> 1.21
    # token 2: (0.5-0)² = 0.25, (0.8-0)² = 0.64 -> 0.64, clipped
    # token 3: (1.5-1)² = 0.25, (1.2-1)² = 0.04 -> 0.25: moved away from the target, not clipped
    loss, metrics = ppo_value_loss(v, old_v, target, t([1, 1, 1, 1, 0]), clip=0.2)
    assert close(loss, 0.5 * (0.64 + 1.21 + 0.64 + 0.25) / 4)  # 0.3425
    assert close(metrics["value_clip_fraction"], 2 / 4)
    loss.backward()
    # d/dV of ½(V-R)²/4 is (V-R)/4 where unclipped; 0 where the clipped error wins.
    assert v.grad is not None and close(v.grad, [[0.0, 1.1 / 4, 0.0, 0.5 / 4, 0.0]])


def test_entropy_by_hand() -> None:
    logits = torch.log(t([0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.25, 0.0], [1.0, 2.0, 3.0, 4.0]))
    logits = logits[None].requires_grad_(True)  # (1, 3, 4); token 1 has a -inf logit
    # Uniform over 4: ln 4 = 2·ln 2. (½, ¼, ¼, 0): ½·ln 2 + 2·¼·ln 4 = 1.5·ln 2. Token 2 padded.
    entropy = entropy_from_logits(logits, t([1, 1, 0]))
    assert close(entropy, (2 * LN2 + 1.5 * LN2) / 2)
    entropy.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert (logits.grad[0, 2] == 0).all()
    assert entropy_from_logits(logits.detach().bfloat16(), t([1, 1, 0])).dtype == torch.float32


# -------------------------------------------------------------------------------------- GRPO


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # Group 1: mean ½, sample std √((4·¼)/3) = √(1/3). Group 2: all equal -> zeros.
    s = math.sqrt(1 / 3) + 1e-6
    assert close(group_advantages(rewards, 4), [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0])
    assert close(group_advantages(rewards, 4, scale=False), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    same = group_advantages(torch.full((3,), 0.1), 3)
    assert torch.equal(same, torch.zeros(3))  # exact, whatever the rounding of the mean
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(rewards, 3)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(rewards, 1)


def grpo_inputs() -> tuple[torch.Tensor, ...]:
    """Two sequences, the second one token shorter; see test_grpo_loss_by_hand."""
    old = t([-1.0, -2.0, -1.5], [-0.5, -1.0, -1.0])
    log_ratio = torch.log(t([1.0, 1.5, 0.5], [0.5, 1.0, 1.0]))
    logp = old + log_ratio
    logp[1, 2] = NAN  # padding
    ref = logp + torch.log(t([1.0, 2.0, 1.0], [0.5, 1.0, 1.0]))  # π_ref/π per token
    return logp, old, ref, torch.tensor([1.0, -0.5]), t([1, 1, 1], [1, 1, 0])


def test_grpo_loss_by_hand() -> None:
    logp, old, ref, adv, mask = grpo_inputs()
    # Row 0, Â = 1: ρ = 1 -> -1; ρ = 1.5 -> -min(1.5, 1.2) = -1.2 (clipped); ρ = 0.5 -> -0.5.
    # Row 1, Â = -½: ρ = 0.5 -> -min(-0.25, -0.4) = 0.4 (clipped); ρ = 1 -> 0.5.
    policy = ((-1.0 - 1.2 - 0.5) / 3 + (0.4 + 0.5) / 2) / 2  # -0.225: sequence means, then batch
    # k3 = r - ln r - 1 with r = π_ref/π: row 0 (0, 2 - ln 2 - 1, 0), row 1 (½ + ln 2 - 1, 0).
    kl = ((1 - LN2) / 3 + (LN2 - 0.5) / 2) / 2
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, clip=0.2, beta=0.1)
    assert close(loss, policy + 0.1 * kl)
    assert close(metrics["kl"], kl)
    assert close(metrics["clip_fraction"], 2 / 5)
    # β = 0 needs no reference; the loss is the policy part alone.
    loss0, metrics0 = grpo_loss(logp, old, None, adv, mask, clip=0.2, beta=0.0)
    assert close(loss0, policy) and "kl" not in metrics0
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(logp, old, None, adv, mask, clip=0.2, beta=0.1)


def test_grpo_gradients_cut_where_clipped_and_padding_ignored() -> None:
    logp, old, ref, adv, mask = grpo_inputs()  # NaN at the padded position of logp and ref
    logp.requires_grad_(True)
    grpo_loss(logp, old, None, adv, mask, clip=0.2, beta=0.0)[0].backward()
    assert logp.grad is not None
    # d/d logp of -Â·ρ, weighted 1/(|o_i|·B); clipped tokens (0,1) and (1,0) get nothing.
    expected = [[-1.0 * 1.0 / 6, 0.0, -1.0 * 0.5 / 6], [0.0, 0.5 * 1.0 / 4, 0.0]]
    assert close(logp.grad, expected)
    logp.grad = None
    grpo_loss(logp, old, ref, adv, mask, clip=0.2, beta=0.1)[0].backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[1, 2] == 0


# ----------------------------------------------------------------------------- controllers


def test_adaptive_kl_controller_by_hand() -> None:
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    ctl.update(12.0, n_steps=256)  # error 12/6 - 1 = 1, clipped to 0.2
    assert close(ctl.value, 0.2 * (1 + 0.2 * 256 / 10_000))
    ctl.update(6.6, n_steps=1000)  # error 0.1
    assert close(ctl.value, 0.2 * (1 + 0.2 * 256 / 10_000) * (1 + 0.1 * 1000 / 10_000))
    before = ctl.value
    ctl.update(1.0, n_steps=100)  # error 1/6 - 1, clipped to -0.2
    assert close(ctl.value, before * (1 - 0.2 * 100 / 10_000))


def test_adaptive_kl_controller_reaches_the_target() -> None:
    # A toy policy whose KL is inversely proportional to β: the target 6 needs β = 0.2.
    for start in (0.02, 2.0):
        ctl = AdaptiveKLController(start, target=6.0, horizon=100)
        gaps = []
        for _ in range(400):
            kl = 1.2 / ctl.value
            gaps.append(abs(kl - 6.0))
            ctl.update(kl, n_steps=10)
        assert gaps[-1] < 0.05 * 6.0 and all(b <= a + 1e-9 for a, b in itertools.pairwise(gaps))


def test_controllers_state_round_trip() -> None:
    ctl = AdaptiveKLController(0.1, target=3.0, horizon=50)
    ctl.update(9.0, n_steps=5)
    fresh = AdaptiveKLController(0.1, target=3.0, horizon=50)
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.value == ctl.value != 0.1
    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=10)
    assert fixed.value == 0.05 and fixed.state_dict() == {"value": 0.05}
    fixed.load_state_dict({"value": 0.2})
    assert fixed.value == 0.2


# ------------------------------------------------------------------------ running moments


def test_running_moments_match_numpy_and_round_trip() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (1, 7, 64, 3, 200)]
    moments = RunningMoments()
    for i, batch in enumerate(batches):
        moments.update(torch.tensor(batch, dtype=torch.float32).view(-1, 1))
        seen = np.concatenate(batches[: i + 1]).astype(np.float32).astype(np.float64)
        assert math.isclose(moments.mean, seen.mean(), rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(moments.std, seen.std(), rel_tol=1e-12, abs_tol=1e-12)
        assert moments.count == len(seen)
    x = torch.tensor([0.0, 3.0, 10.0])
    expected = (x.double() - moments.mean) / moments.std
    assert close(moments.normalise(x), expected.float(), tol=1e-5)
    assert close(moments.normalise(x, shift_mean=False), (x.double() / moments.std).float(), 1e-5)
    resumed = RunningMoments()
    resumed.load_state_dict(moments.state_dict())
    extra = torch.randn(5)
    moments.update(extra)
    resumed.update(extra)
    assert resumed.state_dict() == moments.state_dict()


def test_running_moments_before_two_values_leave_the_scale() -> None:
    moments = RunningMoments()
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(moments.normalise(x), x)
    moments.update(torch.tensor([5.0]))
    assert torch.equal(moments.normalise(x), x - 5.0)  # mean known, std not yet
    moments.update(torch.tensor([]))  # an empty batch changes nothing
    assert moments.count == 1


def test_clip_rewards() -> None:
    assert close(clip_rewards(torch.tensor([-3.0, 0.5, 7.0]), 2.0), [-2.0, 0.5, 2.0])
    with pytest.raises(ValueError, match="positive"):
        clip_rewards(torch.tensor([1.0]), 0.0)
