"""The performance options compute what the plain paths compute: static-cache and compiled
decoding, activation checkpointing, and torch.compile inside the engine."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch
from conftest import small_config
from stagerun import REPO, stage_env
from torch._dynamo.utils import counters

from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, generate, release_static_caches
from lmforge.model import AttentionMask, attend, build_model, checkpoint_layers

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]


@functools.cache
def _no_inductor() -> str:
    """Why torch.compile's inductor cannot build kernels here ('' when it can)."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4))
    except Exception as e:  # no C compiler, missing headers, ...
        return f"inductor cannot build on this machine: {type(e).__name__}: {e}"[:300]
    return ""


def _needs_inductor() -> None:
    reason = _no_inductor()
    if reason:
        pytest.skip(reason)


def _same_generation(a, b) -> None:
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", ["rope", "alibi", "learned", "sinusoidal"])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_static_cache_decodes_the_same_tokens(position: str, kv_heads: int) -> None:
    model = build_model(small_config(position=position, n_kv_heads=kv_heads), seed=11)
    for temperature in (0.0, 1.0):
        cfg = GenerateConfig(max_new_tokens=14, temperature=temperature, seed=3)
        plain = generate(model, PROMPTS, cfg)
        eos = int(plain.tokens[0, 4])  # row 0 stops early: EOS handling on both paths
        static = GenerateConfig(
            max_new_tokens=14, temperature=temperature, seed=3, static_cache=True
        )
        _same_generation(plain, generate(model, PROMPTS, static))
        _same_generation(
            generate(model, PROMPTS, cfg, eos_ids=[eos]),
            generate(model, PROMPTS, static, eos_ids=[eos]),
        )


def test_static_cache_fills_the_position_limit() -> None:
    model = build_model(small_config(max_seq_len=24), seed=12)
    cfg = GenerateConfig(max_new_tokens=24 - 6, temperature=0.0)  # prompt 6: exactly the limit
    static = GenerateConfig(max_new_tokens=24 - 6, temperature=0.0, static_cache=True)
    _same_generation(generate(model, PROMPTS, cfg), generate(model, PROMPTS, static))


@pytest.mark.slow
def test_compiled_decode_decodes_the_same_tokens() -> None:
    _needs_inductor()
    model = build_model(small_config(), seed=13)
    for temperature in (0.0, 1.0):
        plain = generate(model, PROMPTS, GenerateConfig(max_new_tokens=10, temperature=temperature))
        fast = GenerateConfig(max_new_tokens=10, temperature=temperature, compile=True)
        _same_generation(plain, generate(model, PROMPTS, fast))
        graphs = counters["stats"]["unique_graphs"]
        _same_generation(plain, generate(model, PROMPTS, fast))  # the kept cache, same buffers:
        assert counters["stats"]["unique_graphs"] == graphs  # nothing is compiled again
    release_static_caches()


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masked_gqa_with_repeated_heads_equals_enable_gqa(kind: str) -> None:
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64)  # (B, H, T, E)
    k, v = (
        torch.randn(2, 2, 7, 8, dtype=torch.float64),
        torch.randn(2, 2, 7, 8, dtype=torch.float64),
    )
    allowed = torch.rand(2, 1, 5, 7) > 0.3
    allowed[..., 0] = True  # every query sees a key
    if kind == "bool":
        mask = AttentionMask(allowed, False)
    else:  # ALiBi-style additive biases per head
        bias = torch.randn(2, 4, 5, 7, dtype=torch.float64)
        mask = AttentionMask(bias.masked_fill(~allowed, float("-inf")), False)
    grouped = attend(q, k, v, mask, 0.0, expand_kv=False)
    repeated = attend(q, k, v, mask, 0.0, expand_kv=True)
    torch.testing.assert_close(grouped, repeated, atol=1e-12, rtol=1e-12)


def test_activation_checkpointing_gives_the_same_loss_and_gradients() -> None:
    cfg = small_config(embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    results = []
    for recompute in (False, True):
        model = build_model(cfg, seed=14).train()
        if recompute:
            assert checkpoint_layers(model) == 1
        torch.manual_seed(5)  # the same dropout masks; recomputation replays them
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=0, rtol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], atol=1e-6, rtol=1e-6, msg=name)


def test_activation_checkpointing_needs_a_gpt() -> None:
    with pytest.raises(ConfigError, match=r"engine\.activation_checkpointing"):
        checkpoint_layers(torch.nn.Linear(2, 2))


# Three optimizer steps of the tiny preset through lmforge's engine, once per variant (JSON of
# EngineConfig fields); prints each variant's losses and first parameter names.
_ENGINE_RUN = """
import json, sys, torch
from lmforge.config import load_preset
from lmforge.distributed import DistInfo
from lmforge.engine import EngineConfig, build_engine, init_distributed
from lmforge.model import ModelConfig, build_model
from lmforge.optim import OptimConfig
init_distributed(DistInfo())
cfg = load_preset(ModelConfig, "tiny")
gen = torch.Generator().manual_seed(0)
batches = [torch.randint(0, cfg.vocab_size, (2, 33), generator=gen) for _ in range(3)]
out = {}
for name, fields in json.loads(sys.argv[1]).items():
    engine = build_engine(
        build_model(cfg, seed=0), EngineConfig(precision="fp32", **fields),
        OptimConfig(lr=1e-3, warmup_steps=0), micro_batch=2, grad_accum=1, total_steps=3,
        info=DistInfo(),
    )
    losses = []
    for b in batches:
        loss = engine(input_ids=b[:, :-1], labels=b[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    out[name] = {"losses": losses, "names": sorted(engine.module.state_dict())}
    engine.ds.destroy()
print(json.dumps(out))
"""


def _engine_losses(variants: dict[str, dict[str, object]]) -> dict[str, dict]:
    result = subprocess.run(
        [sys.executable, "-c", _ENGINE_RUN, json.dumps(variants)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=stage_env(),
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_engine_activation_checkpointing_trains_the_same() -> None:
    out = _engine_losses(
        {
            "plain": {"zero_stage": 2},
            "recompute": {"zero_stage": 2, "activation_checkpointing": True},
            "recompute_zero3": {"zero_stage": 3, "activation_checkpointing": True},
        }
    )
    for name in ("recompute", "recompute_zero3"):
        assert out[name]["losses"] == pytest.approx(out["plain"]["losses"], rel=1e-5, abs=1e-6)
    assert out["plain"]["losses"][2] < out["plain"]["losses"][0]  # it does train


@pytest.mark.slow
def test_engine_compile_trains_the_same_as_eager() -> None:
    _needs_inductor()
    out = _engine_losses({"eager": {}, "compiled": {"compile": True}})
    assert out["compiled"]["losses"] == pytest.approx(out["eager"]["losses"], rel=1e-5, abs=1e-5)
    assert out["compiled"]["names"] == out["eager"]["names"]  # checkpoints keep their key names
