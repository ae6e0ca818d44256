"""LoRA through peft: only adapters train, merging gives a plain GPT with the same logits that
the one checkpoint format saves and loads, tied embeddings stay tied."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import small_config
from peft.tuners.tuners_utils import BaseTunerLayer

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.config import from_dict
from lmforge.errors import ConfigError
from lmforge.lora import LoraSettings, apply_lora, lora_parameters, merge_lora
from lmforge.model import GPT, build_model

ON = LoraSettings(enabled=True, rank=4, alpha=8)


def train_adapters(model: GPT, steps: int = 5) -> None:
    """A few AdamW steps on the language-model loss, adapters only."""
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, model.cfg.vocab_size, (4, 17), generator=gen)
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_only_adapters_are_trainable() -> None:
    model = build_model(small_config(), seed=0)
    plain_keys = set(model.state_dict())
    out = apply_lora(model, ON)
    assert out is model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # A and B for each of 7 layers in each of 2 blocks.
    assert len(trainable) == 2 * 7 * model.cfg.n_layers
    assert len(lora_parameters(model)) == len(trainable)
    assert set(model.state_dict()) != plain_keys  # peft's modules are in place
    # B starts at zero: the adapted model computes what the base model did.
    base = build_model(small_config(), seed=0).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), base(ids))


def test_training_changes_only_adapters() -> None:
    model = apply_lora(build_model(small_config(), seed=1), ON)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_adapters(model)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert not torch.equal(p, before[name]), name  # A and B both moved
        else:
            assert torch.equal(p, before[name]), name  # bit-identical base weights
            assert p.grad is None, name


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_merged_model_matches_and_saves(tmp_path: Path, tied: bool) -> None:
    cfg = small_config(tie_embeddings=tied)
    model = apply_lora(build_model(cfg, seed=2), ON)
    if tied:
        assert model.output.weight is model.tok_embeddings.weight
    train_adapters(model)
    ids = torch.randint(0, 97, (3, 11))
    with torch.no_grad():
        adapted = model(ids)
    embedding = model.tok_embeddings.weight.detach().clone()
    output = model.output.weight.detach().clone()

    merged = merge_lora(model)
    assert isinstance(merged, GPT)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert set(merged.state_dict()) == set(build_model(cfg, seed=0).state_dict())
    assert all(p.requires_grad for p in merged.parameters())
    assert torch.equal(merged.tok_embeddings.weight, embedding)  # never adapted
    assert torch.equal(merged.output.weight, output)
    if tied:
        assert merged.output.weight is merged.tok_embeddings.weight
    with torch.no_grad():
        out = merged(ids)
    assert (out - adapted).abs().max() < 1e-5
    assert (adapted - build_model(cfg, seed=2).eval()(ids)).abs().max() > 1e-3  # it learned

    path = save_checkpoint(tmp_path / "merged", merged, stage="sft", step=5)
    loaded, _, _ = load_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(loaded(ids), out)
    assert (loaded.output.weight is loaded.tok_embeddings.weight) is tied


def test_disabled_is_a_no_op_and_settings_are_checked() -> None:
    model = build_model(small_config(), seed=0)
    assert apply_lora(model, LoraSettings()) is model
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())

    cfg = from_dict(LoraSettings, {"enabled": True, "rank": 2, "target_modules": ["wq", "wv"]})
    assert cfg.alpha == 16.0 and cfg.target_modules == ["wq", "wv"]
    with pytest.raises(ConfigError, match=r"lora\.target_modules\[1\]: .*did you mean 'wq'"):
        from_dict(LoraSettings, {"target_modules": ["wv", "wqq"]}, prefix="lora")
    with pytest.raises(ConfigError, match=r"lora\.target_modules\[0\]: .*choose from"):
        from_dict(LoraSettings, {"target_modules": ["output"]}, prefix="lora")
    with pytest.raises(ConfigError, match=r"lora\.rank"):
        from_dict(LoraSettings, {"rank": 0}, prefix="lora")
    with pytest.raises(ConfigError, match=r"lora\.dropout"):
        from_dict(LoraSettings, {"dropout": 1.0}, prefix="lora")

    gelu = build_model(small_config(mlp="gelu"), seed=0)  # no w3 in a GELU MLP
    with pytest.raises(ConfigError, match="'w3'"):
        apply_lora(gelu, ON)
    twice = apply_lora(build_model(small_config(), seed=0), ON)
    with pytest.raises(ValueError, match="already"):
        apply_lora(twice, ON)
