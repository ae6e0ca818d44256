"""Hugging Face interoperability: HF Llama -> lmforge, lmforge -> plain transformers, Auto* for
non-Llama variants, HF generate on our wrapper, and sharded checkpoints. All fp32 on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import small_config
from safetensors.torch import load_file
from stagerun import plain_transformers
from transformers import AutoModelForCausalLM

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.generate import GenerateConfig, generate
from lmforge.hf import LmforgeForCausalLM
from lmforge.model import GPT, build_model
from lmforge.tokenizer import train_tokenizer

ATOL = 1e-4
TEXTS = [f"the quick brown fox {i} jumps over the lazy dog, again and again." for i in range(40)]


# These models are tiny: one intra-op thread is faster (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def batches(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (3, 12), a left-padded attention mask (3, 12), position ids from that mask)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5] = 0  # left padding of 5
    mask[1, :1] = 0  # of 1; row 2 has none
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): padding does not count
    return ids, mask, positions


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def assert_same_weights(a: GPT, b: GPT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------ HF Llama -> lmforge


def random_llama(tied: bool) -> transformers.LlamaForCausalLM:
    """A GQA Llama with a non-default rope_theta and weights far from their init values."""
    cfg = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=5000.0,
        rms_norm_eps=1e-6,
        initializer_range=0.2,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(1 if tied else 2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that swapping two of them would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize(
    ("tied", "shard"),
    [(True, None), (False, None), (False, "20KB")],
    ids=["tied", "untied", "untied_sharded"],
)
def test_hf_llama_loads_with_same_logits(tmp_path: Path, tied: bool, shard: str | None) -> None:
    hf = random_llama(tied)
    kwargs = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path, **kwargs)
    assert not (tmp_path / "lmforge.json").exists()
    if shard:
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) >= 2

    ours, tokenizer, meta = load_checkpoint(tmp_path)
    assert tokenizer is None
    assert meta["path"] == str(tmp_path)
    cfg = ours.cfg
    assert (cfg.n_heads, cfg.kv_heads, cfg.hidden_dim) == (4, 2, 48)
    assert cfg.rope_theta == 5000.0
    assert cfg.norm_eps == 1e-6
    assert cfg.tie_embeddings is tied
    assert (ours.output.weight is ours.tok_embeddings.weight) is tied

    ids, mask, positions = batches(101)
    with torch.no_grad():
        theirs = hf(ids).logits
        assert theirs.abs().max() > 1.0  # a comparison of near-zero logits would prove little
        assert max_diff(ours(ids), theirs) < ATOL

        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
        mine = ours(ids, attention_mask=mask, position_ids=positions)
    real = mask.bool()  # padded positions are garbage on both sides
    assert max_diff(mine[real], theirs[real]) < ATOL


# ------------------------------------------------------- lmforge -> plain transformers


_PLAIN_TRANSFORMERS = r"""
import json, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

job = json.loads(sys.argv[1])
ids = torch.tensor(job["ids"])
mask = torch.tensor(job["mask"])
positions = torch.tensor(job["positions"])
report, tensors = {}, {}
for name, path in job["dirs"].items():
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        tensors[name + ".plain"] = model(ids).logits.contiguous()
        tensors[name + ".padded"] = model(
            ids, attention_mask=mask, position_ids=positions
        ).logits.contiguous()
    report[name] = {
        "class": type(model).__name__,
        "model_type": model.config.model_type,
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "text_ids": tok(job["text"])["input_ids"],
        "chat": tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        ),
        "eos": model.generation_config.eos_token_id,
        "pad": model.generation_config.pad_token_id,
    }
save_file(tensors, job["out"])
report["lmforge_imported"] = any(m == "lmforge" or m.startswith("lmforge.") for m in sys.modules)
print(json.dumps(report))
"""


def test_llama_variant_loads_in_plain_transformers(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(TEXTS, 300)
    vocab = len(tokenizer)
    variants = {
        "tied": small_config(vocab_size=vocab, rope_theta=500.0, init_std=0.2),
        "untied": small_config(
            vocab_size=vocab,
            tie_embeddings=False,
            head_dim=12,
            n_kv_heads=1,
            bias=True,
            ffn_dim=72,
            init_std=0.2,
        ),
    }
    models: dict[str, GPT] = {}
    dirs: dict[str, str] = {}
    for name, cfg in variants.items():
        models[name] = build_model(cfg, seed=len(name)).eval()
        with torch.no_grad():  # biases and norms away from their init values
            for p in models[name].parameters():
                if p.ndim == 1:
                    p.uniform_(0.5, 1.5)
        path = save_checkpoint(tmp_path / name, models[name], tokenizer, step=1)
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"] == "llama"
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["tie_word_embeddings"] is cfg.tie_embeddings
        dirs[name] = str(path)

    ids, mask, positions = batches(vocab)
    text = "the lazy dog 123"
    out = tmp_path / "logits.safetensors"
    job = {
        "dirs": dirs,
        "ids": ids.tolist(),
        "mask": mask.tolist(),
        "positions": positions.tolist(),
        "text": text,
        "out": str(out),
    }
    report = plain_transformers(_PLAIN_TRANSFORMERS, job, tmp_path)
    logits = load_file(out)

    real = mask.bool()
    for name, model in models.items():
        info = report[name]
        assert info["class"] == "LlamaForCausalLM"
        assert info["model_type"] == "llama"
        assert info["tied"] is model.cfg.tie_embeddings
        assert info["text_ids"] == tokenizer(text)["input_ids"]
        assert info["chat"] == "<|bos|><|user|>\nhi<|end|>\n<|assistant|>\n"
        end = tokenizer.convert_tokens_to_ids("<|end|>")
        assert info["eos"] == [tokenizer.eos_token_id, end]  # chats stop at <|end|> too
        assert info["pad"] == tokenizer.pad_token_id
        with torch.no_grad():
            plain = model(ids)
            padded = model(ids, attention_mask=mask, position_ids=positions)
        assert plain.abs().max() > 1.0
        assert max_diff(logits[name + ".plain"], plain) < ATOL
        assert max_diff(logits[name + ".padded"][real], padded[real]) < ATOL


# ------------------------------------------------------- non-Llama variants via Auto*

NON_LLAMA = {
    "alibi": {"position": "alibi"},
    "layernorm_bias": {"norm": "layernorm", "bias": True},
    "gelu": {"mlp": "gelu", "ffn_dim": 80},
    "post_norm": {"norm_position": "post"},
    "learned_untied": {"position": "learned", "tie_embeddings": False},
    "sinusoidal_mha": {"position": "sinusoidal", "n_kv_heads": None},
}


@pytest.mark.parametrize("variant", list(NON_LLAMA))
def test_non_llama_variant_loads_with_auto_model(tmp_path: Path, variant: str) -> None:
    cfg = small_config(init_std=0.3, **NON_LLAMA[variant])
    model = build_model(cfg, seed=7).eval()
    path = save_checkpoint(tmp_path / "ckpt", model, step=1)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "lmforge"
    assert config["architectures"] == ["LmforgeForCausalLM"]

    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert isinstance(hf, LmforgeForCausalLM)
    assert hf.model.cfg == cfg
    assert_same_weights(hf.model, model)
    if cfg.tie_embeddings:
        assert hf.model.output.weight is hf.model.tok_embeddings.weight

    ids, mask, positions = batches(cfg.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        assert max_diff(hf(ids).logits, model(ids)) < ATOL
        # The wrapper derives position ids from the mask, as HF models do for left padding.
        theirs = hf(ids, attention_mask=mask).logits
        mine = model(ids, attention_mask=mask, position_ids=positions)
        assert max_diff(theirs[real], mine[real]) < ATOL
        # HF labels are unshifted; the wrapper shifts them like every HF causal LM.
        loss = hf(ids, labels=ids).loss
        assert abs(loss.item() - model(ids[:, :-1], labels=ids[:, 1:]).item()) < ATOL

    greedy = GenerateConfig(temperature=0, max_new_tokens=8)
    prompt = [5, 9, 3, 17, 42]
    ours = generate(model, [prompt], greedy).tokens[0].tolist()
    assert len(set(ours)) > 1  # a constant continuation would make the check weak
    out = hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
    )
    assert out[0, : len(prompt)].tolist() == prompt
    assert out[0, len(prompt) :].tolist() == ours

    # A left-padded batch generates the same tokens too.
    prompts = [prompt, [8, 1]]
    gen = generate(model, prompts, greedy, pad_id=0)
    out = hf.generate(
        gen.prompt_tokens,
        attention_mask=gen.prompt_mask,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
    )
    assert out[:, gen.prompt_tokens.shape[1] :].tolist() == gen.tokens.tolist()


# ------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_embeddings": False}, {"position": "alibi", "norm": "layernorm"}],
    ids=["llama_tied", "llama_untied", "lmforge"],
)
def test_sharded_checkpoint(tmp_path: Path, overrides: dict[str, object]) -> None:
    cfg = small_config(init_std=0.2, **overrides)
    model = build_model(cfg, seed=11).eval()
    path = save_checkpoint(tmp_path / "ckpt", model, max_shard_bytes=16 * 1024, step=3)

    shards = sorted(p.name for p in path.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (path / "model.safetensors").exists()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    stored: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors = load_file(path / shard)
        assert all(index["weight_map"][key] == shard for key in tensors)
        stored.update(tensors)
    assert set(stored) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in stored.values()
    )
    manifest = json.loads((path / "lmforge.json").read_text())["files"]
    assert set(shards) | {"model.safetensors.index.json"} <= set(manifest)

    loaded, _, meta = load_checkpoint(path)
    assert meta["step"] == 3
    assert loaded.cfg == cfg
    assert_same_weights(loaded, model)

    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    expected = "LlamaForCausalLM" if cfg.position == "rope" else "LmforgeForCausalLM"
    assert type(hf).__name__ == expected
    ids, _, _ = batches(cfg.vocab_size)
    with torch.no_grad():
        assert max_diff(hf(ids).logits, model(ids)) < ATOL
