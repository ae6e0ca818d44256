"""The fused, chunked cross-entropy equals the plain one, gradients included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.loss import LossConfig, linear_cross_entropy


def _inputs(n: int = 37, d: int = 16, v: int = 50) -> tuple[torch.Tensor, ...]:
    hidden = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    labels[::5] = -100
    return hidden, weight, labels


def _loss_and_grads(cfg: LossConfig, hidden, weight, labels) -> tuple[torch.Tensor, ...]:
    hidden.grad = weight.grad = None
    total, count = linear_cross_entropy(hidden, weight, labels, cfg)
    (total / count).backward()
    return (total / count).detach(), hidden.grad.clone(), weight.grad.clone(), count


@pytest.mark.parametrize(("smoothing", "z"), [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_chunked_equals_plain(smoothing: float, z: float, chunk: int) -> None:
    hidden, weight, labels = _inputs()
    plain = _loss_and_grads(LossConfig(smoothing, z, 0), hidden, weight, labels)
    fused = _loss_and_grads(LossConfig(smoothing, z, chunk), hidden, weight, labels)
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_torch_cross_entropy(smoothing: float) -> None:
    hidden, weight, labels = _inputs()
    ours, _, _, count = _loss_and_grads(LossConfig(smoothing, 0.0, 8), hidden, weight, labels)
    ref = F.cross_entropy(hidden @ weight.t(), labels, label_smoothing=smoothing)
    torch.testing.assert_close(ours.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    assert count == (labels != -100).sum()


def test_z_loss_adds_the_squared_log_partition() -> None:
    hidden, weight, labels = _inputs()
    base = _loss_and_grads(LossConfig(0.0, 0.0, 8), hidden, weight, labels)[0]
    with_z = _loss_and_grads(LossConfig(0.0, 0.5, 8), hidden, weight, labels)[0]
    lse = torch.logsumexp(hidden @ weight.t(), dim=-1)[labels != -100]
    expected = 0.5 * lse.square().mean().detach()
    torch.testing.assert_close((with_z - base).double(), expected, atol=1e-4, rtol=1e-6)


def test_bf16_weights_get_bf16_gradients() -> None:
    hidden = torch.randn(12, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 40, (12,))
    total, count = linear_cross_entropy(hidden, weight, labels, LossConfig(chunk_size=4))
    assert total.dtype == torch.float32  # the loss itself is accumulated in fp32
    (total / count).backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    ref = F.cross_entropy((hidden.float() @ weight.float().t()), labels)
    assert (total / count).item() == pytest.approx(ref.item(), rel=2e-2)


def test_all_ignored_gives_zero_not_nan() -> None:
    hidden, weight, _ = _inputs()
    labels = torch.full((37,), -100)
    total, count = linear_cross_entropy(hidden, weight, labels, LossConfig())
    assert total.item() == 0.0 and count.item() == 0


@pytest.mark.parametrize("kwargs", [{"label_smoothing": 1.0}, {"z_loss": -1.0}, {"chunk_size": -1}])
def test_bad_values_name_the_key(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match=r"loss\."):
        LossConfig(**kwargs).validate("loss")
