"""Pretraining objectives: causal, masked next-token (GPT-BERT), prefix, and the mixture."""

from __future__ import annotations

import pytest
import torch
from conftest import small_config

from lmforge.errors import ConfigError
from lmforge.model import build_model
from pretrain.objectives import (
    ObjectiveConfig,
    apply_objective,
    choose_objective,
    sample_generators,
)

VOCAB, MASK_ID = 97, 3
SPECIAL = torch.tensor([0, 1, 2, 3])


def _batch(b: int = 4, t: int = 32) -> dict[str, torch.Tensor]:
    window = torch.randint(8, VOCAB, (b, t + 1))
    window[:, 0] = 0  # a BOS that must never be selected
    return {"input_ids": window[:, :-1], "labels": window[:, 1:]}


def _apply(name: str, batch, cfg=None, positions=None) -> dict:
    positions = positions if positions is not None else list(range(len(batch["input_ids"])))
    return apply_objective(
        name,
        batch,
        cfg or ObjectiveConfig(),
        mask_id=MASK_ID,
        vocab_size=VOCAB,
        special_ids=SPECIAL,
        generators=sample_generators(7, positions),
    )


def test_causal_passes_the_packed_batch_through() -> None:
    batch = {**_batch(), "doc_ids": torch.zeros(4, 32, dtype=torch.long)}
    out = _apply("causal", batch)
    assert torch.equal(out["labels"], batch["labels"]) and "attention" not in out
    assert torch.equal(out["doc_ids"], batch["doc_ids"])


def test_mlm_labels_only_selected_tokens_shifted_by_one() -> None:
    batch = _batch(8, 64)
    out = _apply("mlm", batch)
    ids, corrupted, labels = batch["input_ids"], out["input_ids"], out["labels"]
    assert out["attention"] == "bidirectional"
    scored = labels != -100  # (B, T): position i-1 scores token i
    selected = torch.zeros_like(scored)
    selected[:, 1:] = scored[:, :-1]
    assert torch.equal(labels[scored], ids[:, 1:][scored[:, :-1]])
    assert not scored[:, -1].any()  # nothing predicts past the window
    assert torch.equal(corrupted[~selected], ids[~selected])  # only selected tokens change
    assert not selected[:, 0].any() and torch.all(ids[selected] >= 4)  # specials never


def test_mlm_80_10_10_split_holds_statistically() -> None:
    batch = _batch(64, 256)
    out = _apply("mlm", batch, positions=list(range(64)))
    ids, corrupted, labels = batch["input_ids"], out["input_ids"], out["labels"]
    selected = torch.zeros_like(ids, dtype=torch.bool)
    selected[:, 1:] = labels[:, :-1] != -100
    rate = selected[:, 1:].float().mean().item()
    assert rate == pytest.approx(0.15, abs=0.01)
    n = selected.sum().item()
    masked = (corrupted[selected] == MASK_ID).sum().item() / n
    kept = (corrupted[selected] == ids[selected]).sum().item() / n
    assert masked == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / VOCAB, abs=0.02)  # kept, or a random hit itself
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.02)


def test_mlm_is_bidirectional_in_the_model() -> None:
    model = build_model(small_config(), seed=0)
    out = _apply("mlm", _batch(2, 32))
    edited = out["input_ids"].clone()
    edited[:, 20] = (edited[:, 20] + 1) % VOCAB
    with torch.no_grad():
        a = model(out["input_ids"], attention="bidirectional")
        b = model(edited, attention="bidirectional")
    assert not torch.allclose(a[:, 5], b[:, 5])  # an earlier position sees the later token
    loss = model(out["input_ids"], labels=out["labels"], attention="bidirectional")
    logits = a.flatten(0, 1)
    keep = out["labels"].flatten() != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], out["labels"].flatten()[keep])
    torch.testing.assert_close(loss, expected)  # the loss counts the selected tokens only


def test_prefix_hides_loss_where_the_target_is_visible() -> None:
    batch = _batch(16, 40)
    out = _apply("prefix", batch)
    assert out["attention"] == "prefix"
    for row, p in enumerate(out["prefix_len"].tolist()):
        assert 4 <= p <= 36  # 0.1·40 .. 0.9·40
        assert torch.all(out["labels"][row, : p - 1] == -100)
        assert torch.equal(out["labels"][row, p - 1 :], batch["labels"][row, p - 1 :])


def test_corruption_does_not_depend_on_how_samples_are_grouped() -> None:
    batch = _batch(4, 32)
    whole = _apply("mlm", batch, positions=[10, 11, 12, 13])
    halves = [
        _apply("mlm", {k: v[i : i + 2] for k, v in batch.items()}, positions=[10 + i, 11 + i])
        for i in (0, 2)
    ]
    assert torch.equal(whole["input_ids"], torch.cat([h["input_ids"] for h in halves]))
    assert torch.equal(whole["labels"], torch.cat([h["labels"] for h in halves]))


def test_mixture_by_batch_follows_the_weights_and_is_deterministic() -> None:
    cfg = ObjectiveConfig(mix={"causal": 0.75, "mlm": 0.25})
    picks = [choose_objective(cfg, step, seed=1) for step in range(2000)]
    assert picks == [choose_objective(cfg, step, seed=1) for step in range(2000)]
    assert picks.count("mlm") / 2000 == pytest.approx(0.25, abs=0.03)
    assert choose_objective(ObjectiveConfig(), 5, seed=1) == "causal"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"mix": {"clm": 1.0}}, "objective.mix.clm"),
        ({"mix": {"causal": 0.0}}, "objective.mix"),
        ({"mask_rate": 1.5}, "objective.mask_rate"),
    ],
)
def test_bad_objective_config_names_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ObjectiveConfig(**kwargs).validate("objective")
