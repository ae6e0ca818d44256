"""Preference losses against values worked out by hand, their gradients' direction, and the
sequence log-probs (plain, chunked, and against the GPT's own loss)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import small_config
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.model import build_model
from lmforge.prefs import (
    bradley_terry_loss,
    dpo_loss,
    sequence_logprobs,
    sequence_logprobs_chunked,
)

# Two pairs. Row 0: log-ratios chosen +1.0, rejected -0.5, so h = 1.5; row 1: chosen -0.5,
# rejected +0.5, so h = -1.0.
PI_C, PI_R = [-10.0, -7.5], [-12.0, -6.0]
REF_C, REF_R = [-11.0, -7.0], [-11.5, -6.5]
BETA = 0.1


def pairs(requires_grad: bool = False) -> list[torch.Tensor]:
    return [torch.tensor(v, requires_grad=requires_grad) for v in (PI_C, PI_R, REF_C, REF_R)]


def softplus(x: float) -> float:
    """log(1 + e^x) = -log σ(-x), by hand."""
    return math.log(1.0 + math.exp(x))


# ---------------------------------------------------------------------------- hand values


def test_dpo_sigmoid_by_hand() -> None:
    loss, metrics = dpo_loss(*pairs(), beta=BETA, kind="sigmoid")
    # -log σ(0.1·1.5) = log(1 + e^-0.15) ≈ 0.620957; -log σ(0.1·-1.0) = log(1 + e^0.1) ≈ 0.744397
    expected = (math.log(1 + math.exp(-0.15)) + math.log(1 + math.exp(0.1))) / 2
    assert expected == pytest.approx(0.682677, abs=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.dtype == torch.float32
    # Implicit rewards: chosen 0.1·[1.0, -0.5], rejected 0.1·[-0.5, 0.5].
    assert metrics["reward_chosen"].item() == pytest.approx(0.025, abs=1e-7)
    assert metrics["reward_rejected"].item() == pytest.approx(0.0, abs=1e-7)
    assert metrics["margin"].item() == pytest.approx(0.025, abs=1e-7)
    assert metrics["accuracy"].item() == 0.5  # row 0 right (0.1 > -0.05), row 1 wrong
    assert not any(m.requires_grad for m in metrics.values())


def test_cdpo_by_hand() -> None:
    eps = 0.2
    loss, _ = dpo_loss(*pairs(), beta=BETA, kind="cdpo", label_smoothing=eps)
    row0 = 0.8 * math.log(1 + math.exp(-0.15)) + 0.2 * math.log(1 + math.exp(0.15))
    row1 = 0.8 * math.log(1 + math.exp(0.1)) + 0.2 * math.log(1 + math.exp(-0.1))
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    # ε = 0 is plain DPO.
    plain, _ = dpo_loss(*pairs(), beta=BETA, kind="sigmoid")
    zero, _ = dpo_loss(*pairs(), beta=BETA, kind="cdpo", label_smoothing=0.0)
    assert zero.item() == plain.item()


def test_ipo_by_hand() -> None:
    loss, metrics = dpo_loss(*pairs(), beta=BETA, kind="ipo")
    # Target margin 1/(2·0.1) = 5: (1.5 - 5)² = 12.25 and (-1 - 5)² = 36, mean 24.125.
    assert loss.item() == pytest.approx(24.125, abs=1e-5)
    assert metrics["accuracy"].item() == 0.5


def test_bradley_terry_by_hand() -> None:
    chosen = torch.tensor([2.0, 0.5, -1.0])
    rejected = torch.tensor([1.0, 1.5, -1.0])
    loss, accuracy = bradley_terry_loss(chosen, rejected)
    # Differences 1, -1, 0: log(1 + e^-1) ≈ 0.313262, log(1 + e) ≈ 1.313262, log 2 ≈ 0.693147.
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.e) + math.log(2)) / 3
    assert expected == pytest.approx(0.773224, abs=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert accuracy.item() == pytest.approx(1 / 3)  # a tie is not a win
    # bf16 scores are compared in fp32.
    loss16, _ = bradley_terry_loss(chosen.bfloat16(), rejected.bfloat16())
    assert loss16.dtype == torch.float32 and loss16.item() == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize(
    ("kind", "eps"), [("sigmoid", 0.0), ("cdpo", 0.1), ("ipo", 0.0)], ids=["dpo", "cdpo", "ipo"]
)
def test_dpo_gradients_favour_chosen(kind: Any, eps: float) -> None:
    pi_c, pi_r, ref_c, ref_r = pairs(requires_grad=True)
    loss, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=BETA, kind=kind, label_smoothing=eps)
    loss.backward()
    assert pi_c.grad is not None and pi_r.grad is not None
    assert (pi_c.grad < 0).all()  # raising log π(chosen) lowers the loss
    assert (pi_r.grad > 0).all()  # raising log π(rejected) raises it
    assert ref_c.grad is None and ref_r.grad is None  # the reference is frozen
    # And a step along the gradient does lower it.
    with torch.no_grad():
        stepped, _ = dpo_loss(
            pi_c + 0.1, pi_r, ref_c, ref_r, beta=BETA, kind=kind, label_smoothing=eps
        )
    assert stepped.item() < loss.item()


def test_bradley_terry_gradient_direction() -> None:
    chosen = torch.tensor([0.3, -0.2], requires_grad=True)
    rejected = torch.tensor([0.1, 0.4], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected)
    loss.backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_dpo_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*pairs(), beta=0.0)
    with pytest.raises(ValueError, match="kind"):
        dpo_loss(*pairs(), beta=BETA, kind="hinge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cdpo"):
        dpo_loss(*pairs(), beta=BETA, kind="sigmoid", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"\[0, 0\.5\)"):
        dpo_loss(*pairs(), beta=BETA, kind="cdpo", label_smoothing=0.5)


# ------------------------------------------------------------------------ sequence log-probs


def test_sequence_logprobs_by_hand() -> None:
    # Position 0: softmax of [0, ln 2, ln 3] is [1/6, 2/6, 3/6] and the label is 2 -> log(1/2).
    # Position 1 is unlabelled. Position 2: softmax of [ln 4, 0, 0] is [4/6, 1/6, 1/6], label 0
    # -> log(2/3). Sum: log(1/2) + log(2/3) = log(1/3).
    logits = torch.tensor(
        [[[0.0, math.log(2), math.log(3)], [5.0, -3.0, 1.0], [math.log(4), 0.0, 0.0]]]
    )
    labels = torch.tensor([[2, -100, 0]])
    out = sequence_logprobs(logits, labels)
    assert out.shape == (1,) and out.dtype == torch.float32
    assert out.item() == pytest.approx(math.log(1 / 3), abs=1e-6)
    # bf16 logits are read in fp32.
    assert sequence_logprobs(logits.bfloat16(), labels).dtype == torch.float32
    # A fully unlabelled row sums to zero.
    assert sequence_logprobs(logits, torch.full((1, 3), -100)).item() == 0.0


def test_sequence_logprobs_agree_with_the_models_loss() -> None:
    model = build_model(small_config(), seed=0)
    ids = torch.randint(0, 97, (3, 16))
    labels = ids[:, 1:].clone()
    labels[0, :5] = -100  # a prompt
    labels[2, 12:] = -100  # padding
    with torch.no_grad():
        per_seq = sequence_logprobs(model(ids[:, :-1]), labels)  # (3,)
        mean_nll = model(ids[:, :-1], labels=labels)
    count = (labels != -100).sum()
    assert (-per_seq.sum() / count).item() == pytest.approx(mean_nll.item(), abs=1e-5)


class _LogitsWatch(TorchDispatchMode):
    """Records the most rows of any tensor produced whose last dimension is the vocabulary
    (views such as weight.t() hold no memory of their own and are skipped)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("chunk", [7, 30, 1024])
def test_chunked_logprobs_equal_plain(chunk: int) -> None:
    b, t, d, v = 3, 10, 16, 53
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, t, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) * 0.5
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[0, :4] = -100
    labels[1, 8:] = -100
    upstream = torch.tensor([1.0, -2.0, 0.5])  # a non-uniform upstream gradient

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain = sequence_logprobs(h1 @ w1.t(), labels)
    (plain * upstream).sum().backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _LogitsWatch(v) as watch:
        chunked = sequence_logprobs_chunked(h2, w2, labels, chunk_size=chunk)
        (chunked * upstream).sum().backward()
    assert watch.largest <= min(chunk, b * t)  # never more than one chunk of logits

    assert chunked.dtype == torch.float32
    assert (chunked - plain).abs().max() < 1e-5
    assert h1.grad is not None and h2.grad is not None
    assert w1.grad is not None and w2.grad is not None
    assert (h2.grad - h1.grad).abs().max() < 1e-5
    assert (w2.grad - w1.grad).abs().max() < 1e-5


def test_chunked_logprobs_from_the_model() -> None:
    model = build_model(small_config(tie_embeddings=False), seed=2)
    ids = torch.randint(0, 97, (2, 12))
    labels = ids[:, 1:].clone()
    labels[1, :3] = -100
    with torch.no_grad():
        plain = sequence_logprobs(model(ids[:, :-1]), labels)
        h = model.hidden_states(ids[:, :-1])
        chunked = sequence_logprobs_chunked(h, model.output.weight, labels, chunk_size=5)
    assert (chunked - plain).abs().max() < 1e-5
    # bf16 inputs: fp32 result, close to the fp32 one.
    h16, w16 = h.bfloat16(), model.output.weight.detach().bfloat16()
    out16 = sequence_logprobs_chunked(h16, w16, labels, chunk_size=5)
    assert out16.dtype == torch.float32
    assert (out16 - plain).abs().max() < 0.1 * plain.abs().max()
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_logprobs_chunked(h, model.output.weight, labels, chunk_size=0)
