"""Parameter groups and learning-rate schedules."""

from __future__ import annotations

import pytest
from conftest import small_config

from lmforge.model import build_model
from lmforge.optim import OptimConfig, lr_factor, param_groups


def test_no_decay_on_norms_biases_and_embeddings() -> None:
    model = build_model(small_config(bias=True, norm="layernorm", tie_embeddings=False))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "tok_embeddings.weight" in kept and "output.weight" in decayed
    assert all(n.endswith("bias") or "norm" in n or "embeddings" in n for n in kept)
    assert all(n.endswith("weight") and "norm" not in n for n in decayed)
    assert len(decayed) + len(kept) == len(list(model.parameters()))


def test_tied_output_is_the_embedding_and_not_decayed() -> None:
    model = build_model(small_config())
    decay, no_decay = param_groups(model, 0.1)
    assert any(p is model.output.weight for p in no_decay["params"])
    assert not any(p is model.output.weight for p in decay["params"])


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        ("cosine", 0, 0.1),  # warmup: (0+1)/10
        ("cosine", 9, 1.0),
        ("cosine", 10, 1.0),
        ("cosine", 55, 0.1 + 0.9 * 0.5),  # halfway through the decay
        ("cosine", 100, 0.1),
        ("linear", 55, 1.0 - 0.9 * 0.5),
        ("constant", 80, 1.0),
        ("inverse_sqrt", 39, (10 / 40) ** 0.5),
        ("wsd", 79, 1.0),  # decay_fraction 0.2: flat until step 80
        ("wsd", 90, 1.0 - 0.9 * 0.5),
        ("wsd", 100, 0.1),
    ],
)
def test_schedules_hand_computed(schedule: str, step: int, expected: float) -> None:
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(step, cfg, total_steps=100) == pytest.approx(expected)
