"""The GPT: attention variants, masks, positions, every option training and reloading."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.config import load_preset
from lmforge.errors import ConfigError
from lmforge.model import (
    ModelConfig,
    alibi_slopes,
    apply_rope,
    build_model,
    flops_per_token,
    matmul_params,
    num_params,
    rope_cos_sin,
)

VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "layernorm": {"norm": "layernorm"},
    "post_norm": {"norm_position": "post"},
    "rope_theta_head_dim": {"rope_theta": 500.0, "head_dim": 12},
    "alibi": {"position": "alibi"},
    "learned": {"position": "learned"},
    "sinusoidal": {"position": "sinusoidal"},
    "no_position": {"position": "none"},
    "mha": {"n_kv_heads": None},
    "mqa": {"n_kv_heads": 1},
    "gelu": {"mlp": "gelu", "ffn_dim": 80},
    "bias": {"bias": True, "norm": "layernorm"},
    "dropout": {"embed_dropout": 0.1, "attn_dropout": 0.1, "resid_dropout": 0.1},
    "untied": {"tie_embeddings": False},
    "plain_init": {"scaled_residual_init": False},
    "gpt2_classic": {
        "norm": "layernorm",
        "position": "learned",
        "mlp": "gelu",
        "bias": True,
        "n_kv_heads": None,
    },
}


def _batch(vocab: int, b: int = 4, t: int = 32) -> torch.Tensor:
    """A learnable batch: each row repeats a short random pattern."""
    pattern = torch.randint(0, vocab, (b, 8))
    return pattern.repeat(1, t // 8)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_option_trains_saves_and_reloads_bit_exactly(name: str, tmp_path) -> None:
    cfg = small_config(**VARIANTS[name])
    model = build_model(cfg, seed=0)
    x = _batch(cfg.vocab_size)
    labels = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(x, labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses

    save_checkpoint(tmp_path / "ckpt", model, stage="test", step=20)
    loaded, tokenizer, meta = load_checkpoint(tmp_path / "ckpt")
    assert tokenizer is None and meta["step"] == 20
    assert loaded.cfg == cfg
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    if cfg.tie_embeddings:
        assert loaded.output.weight is loaded.tok_embeddings.weight


def _copy_as_mha(gqa_model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """An MHA model whose k/v heads repeat the GQA model's shared heads."""
    mha = build_model(small_config(**{**_fields(cfg), "n_kv_heads": None}))
    group = cfg.n_heads // cfg.kv_heads
    state = {}
    for key, value in gqa_model.state_dict().items():
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            heads = value.view(cfg.kv_heads, cfg.head_size, cfg.dim)  # (K, E, D)
            value = heads.repeat_interleave(group, dim=0).reshape(-1, cfg.dim)  # (H·E, D)
        state[key] = value
    mha.load_state_dict(state)
    return mha


def _fields(cfg: ModelConfig) -> dict[str, object]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_gqa_and_mqa_equal_mha_with_shared_heads(kv_heads: int) -> None:
    cfg = small_config(n_kv_heads=kv_heads)
    gqa = build_model(cfg, seed=1)
    mha = _copy_as_mha(gqa, cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    for kind in ("causal", "bidirectional"):
        torch.testing.assert_close(gqa(x, attention=kind), mha(x, attention=kind))


def _reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def test_mha_attention_equals_explicit_softmax() -> None:
    cfg = small_config(n_kv_heads=None, position="none")
    model = build_model(cfg, seed=2)
    attn = model.layers[0].attention
    x = torch.randn(2, 10, cfg.dim)
    from lmforge.model import AttentionMask

    ours = attn(x, AttentionMask(None, True), None, None, 0)
    q = attn.wq(x).view(2, 10, 4, 8).transpose(1, 2)
    k = attn.wk(x).view(2, 10, 4, 8).transpose(1, 2)
    v = attn.wv(x).view(2, 10, 4, 8).transpose(1, 2)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    ref = _reference_attention(q, k, v, causal).transpose(1, 2).reshape(2, 10, 32)
    torch.testing.assert_close(ours, attn.wo(ref))


def _logits_after_edit(model, x, pos, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    edited = x.clone()
    edited[:, pos] = (edited[:, pos] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        return model(x, **kw), model(edited, **kw)


@pytest.mark.parametrize("position", ["rope", "alibi", "learned", "sinusoidal"])
def test_causal_and_prefix_never_see_the_future_bidirectional_does(position: str) -> None:
    model = build_model(small_config(position=position), seed=3)
    x = torch.randint(0, 97, (2, 16))
    a, b = _logits_after_edit(model, x, 10)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.allclose(a[:, 10:], b[:, 10:])

    prefix = torch.tensor([5, 5])
    a, b = _logits_after_edit(model, x, 10, attention="prefix", prefix_len=prefix)
    assert torch.equal(a[:, :10], b[:, :10])
    a, b = _logits_after_edit(model, x, 3, attention="prefix", prefix_len=prefix)
    assert not torch.allclose(a[:, 1], b[:, 1])  # inside the prefix: bidirectional
    a, b = _logits_after_edit(model, x, 10, attention="bidirectional")
    assert not torch.allclose(a[:, 0], b[:, 0])


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
def test_document_mask_blocks_attention_across_documents(kind: str, position: str) -> None:
    model = build_model(small_config(position=position), seed=4)
    x = torch.randint(0, 97, (1, 16))
    docs = torch.tensor([[0] * 7 + [1] * 9])
    pos = torch.tensor([list(range(7)) + list(range(9))])
    a, b = _logits_after_edit(model, x, 2, attention=kind, doc_ids=docs, position_ids=pos)
    assert torch.equal(a[:, 7:], b[:, 7:])
    assert not torch.allclose(a[:, 2:7], b[:, 2:7])
    with torch.no_grad():
        alone = model(x[:, 7:], attention=kind)
    torch.testing.assert_close(a[:, 7:], alone, atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position() -> None:
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> float:
        cos, sin = rope_cos_sin(torch.tensor([[m, n]]), 16, 10000.0, torch.float32)
        qr = apply_rope(q, cos[:, :1], sin[:, :1])
        kr = apply_rope(k, cos[:, 1:], sin[:, 1:])
        return (qr * kr).sum().item()

    base = score(5, 2)
    for shift in (1, 17, 300):
        assert score(5 + shift, 2 + shift) == pytest.approx(base, abs=1e-4)
    assert score(6, 2) != pytest.approx(base, abs=1e-5)  # distance still matters


def test_alibi_slopes_follow_the_paper() -> None:
    assert alibi_slopes(8).tolist() == pytest.approx([2.0**-i for i in range(1, 9)])
    six = alibi_slopes(6).tolist()  # 4 from the power-of-two series, 2 interleaved from 8's
    assert six[:4] == pytest.approx([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8])
    assert six[4:] == pytest.approx([2.0**-1, 2.0**-3])


def test_scaled_residual_init() -> None:
    cfg = small_config(dim=256, n_heads=4, n_kv_heads=4, n_layers=8, vocab_size=300)
    model = build_model(cfg, seed=0)
    layer = model.layers[0]
    expected = 0.02 / math.sqrt(16)
    assert layer.attention.wo.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert layer.feed_forward.w2.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert layer.attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(layer.attention_norm.weight == 1)


def test_loss_ignores_labels_and_matches_torch() -> None:
    cfg = small_config(tie_embeddings=False)
    model = build_model(cfg, seed=5)
    x = torch.randint(0, 97, (2, 12))
    labels = x.clone()
    labels[:, :4] = -100
    logits = model(x)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(model(x, labels=labels), expected)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"n_heads": 5}, "model.n_heads"),
        ({"n_kv_heads": 3}, "model.n_kv_heads"),
        ({"dim": 0}, "model.dim"),
        ({"attn_dropout": 1.5}, "model.attn_dropout"),
        ({"position": "rope", "head_dim": 7}, "model.head_dim"),
    ],
)
def test_bad_shapes_name_the_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelConfig(**{**_fields(small_config()), **overrides}).validate("model")


def test_sequence_longer_than_the_position_limit_is_refused() -> None:
    model = build_model(small_config(max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    ("preset", "low", "high"),
    [
        ("debug", 0.1e6, 0.2e6),
        ("tiny", 1e6, 2e6),
        ("gpt2-124m", 110e6, 130e6),
        ("gpt2-350m", 320e6, 360e6),
        ("1b", 0.9e9, 1.1e9),
        ("7b", 6.7e9, 6.8e9),
    ],
)
def test_presets_build_on_meta_with_expected_size(preset: str, low: float, high: float) -> None:
    cfg = load_preset(ModelConfig, preset)
    model = build_model(cfg, device="meta")
    assert next(model.parameters()).is_meta
    assert low <= num_params(cfg) <= high


def test_flops_per_token_is_palm_formula() -> None:
    cfg = small_config()  # D=32, L=2, H=4, K=2, E=8, F=ceil(8·32/3/64)·64=128, V=97
    n = 2 * (32 * 32 * 2 + 32 * 16 * 2 + 32 * 128 * 3) + 97 * 32
    assert matmul_params(cfg) == n
    assert flops_per_token(cfg, 64) == 6 * n + 12 * 2 * 32 * 64
    model = build_model(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear + model.output.weight.numel() == n
