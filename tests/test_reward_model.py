"""Reward models and critics: pooling at the last real token, the checkpoint format that
`AutoModelForSequenceClassification` loads, round trips, and starting from a causal checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from conftest import small_config
from safetensors.torch import load_file
from stagerun import plain_transformers
from transformers import AutoModelForSequenceClassification

import lmforge  # noqa: F401  (registers LmforgeForSequenceClassification)
from lmforge.checkpoint import load_checkpoint, load_reward_model, save_checkpoint
from lmforge.errors import CheckpointError
from lmforge.hf import LmforgeForSequenceClassification
from lmforge.model import GPT, build_model
from lmforge.prefs import bradley_terry_loss
from lmforge.reward import NoLMHead, RewardModel, build_reward_model
from lmforge.tokenizer import train_tokenizer

ATOL = 1e-4
TEXTS = [f"the quick brown fox {i} jumps over the lazy dog, again and again." for i in range(40)]


# These models are tiny: one intra-op thread is faster (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return train_tokenizer(TEXTS, 300)


def reward_model(vocab: int, seed: int = 1, **overrides: object) -> RewardModel:
    """A reward model with weights far from their init values (norms and biases included)."""
    cfg = small_config(vocab_size=vocab, init_std=0.2, **overrides)
    backbone = build_model(cfg, seed=seed)
    with torch.no_grad():
        for p in backbone.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return build_reward_model(backbone, seed=seed + 100).eval()


def right_padded(vocab: int, pad: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (3, 12), mask (3, 12)): rows of 7, 11 and 12 real tokens, then pad. Real tokens avoid
    the special ids 0..7 so that none equals pad (transformers pools by `ids != pad`)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, vocab, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 7:] = 0
    mask[1, 11:] = 0
    ids[mask == 0] = pad
    return ids, mask


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------------- the model itself


def test_scores_read_the_last_real_token() -> None:
    model = reward_model(97)
    ids, mask = right_padded(97, pad=2)
    with torch.no_grad():
        scores = model(ids, mask)
        assert scores.shape == (3,) and scores.dtype == torch.float32
        assert scores.std() > 0.1  # rows differ: a constant score would prove nothing below

        # Changing a padded position changes nothing (row 0 is padded from 7 on).
        changed = ids.clone()
        changed[0, 9] = 50
        assert torch.equal(model(changed, mask), scores)
        # Changing the last real token changes that row's score and no other.
        changed = ids.clone()
        changed[0, 6] = (ids[0, 6] + 1) % 97
        new = model(changed, mask)
        assert abs(new[0] - scores[0]) > 1e-3
        assert torch.equal(new[1:], scores[1:])

        # last_index gives the same as the mask; without a mask the last column is read.
        assert torch.equal(model(ids, mask, last_index=torch.tensor([6, 10, 11])), scores)
        assert torch.equal(model(ids[2:]), scores[2:])
        # values() is the same head at every position.
        values = model.values(ids, mask)
        assert values.shape == (3, 12)
        torch.testing.assert_close(values[[0, 1, 2], [6, 10, 11]], scores, atol=1e-6, rtol=0)
        # A row scored alone, unpadded, scores the same as in the padded batch.
        alone = model(ids[:1, :7])
        torch.testing.assert_close(alone, scores[:1], atol=1e-5, rtol=0)


def test_backbone_is_shared_and_trained_through_hidden_states() -> None:
    cfg = small_config(tie_embeddings=False)
    backbone = build_model(cfg, seed=0)
    model = build_reward_model(backbone, seed=1)
    assert model.backbone is backbone
    # An untied backbone gives up its LM head; its parameters are the reward model's.
    assert isinstance(backbone.output, NoLMHead)
    ours = {id(p) for p in model.parameters()}
    assert {id(p) for p in backbone.parameters()} <= ours
    assert len(ours) == len(list(backbone.parameters())) + 1
    std = model.score.weight.std().item()
    assert 0.5 / math.sqrt(cfg.dim + 1) < std < 2.0 / math.sqrt(cfg.dim + 1)
    same = build_reward_model(build_model(cfg, seed=0), seed=1)
    assert torch.equal(same.score.weight, model.score.weight)  # the seed decides the head

    ids, mask = right_padded(cfg.vocab_size, pad=2)
    loss, _ = bradley_terry_loss(model(ids[:2], mask[:2]), model(ids[1:], mask[1:]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    tied = build_reward_model(build_model(small_config(), seed=0))
    assert tied.backbone.output.weight is tied.backbone.tok_embeddings.weight
    bf16 = build_reward_model(build_model(small_config(), seed=0, dtype=torch.bfloat16))
    assert bf16.score.weight.dtype == torch.bfloat16
    assert bf16(ids, mask).dtype == torch.float32


# -------------------------------------------------------------------------- the file format


_PLAIN_TRANSFORMERS = r"""
import json, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification

job = json.loads(sys.argv[1])
report, tensors = {}, {}
for name, path in job["dirs"].items():
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, output_loading_info=True
    )
    model.eval()
    with torch.no_grad():
        for batch, (ids, mask) in job["batches"].items():
            out = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
            tensors[f"{name}.{batch}"] = out.contiguous()
    report[name] = {
        "class": type(model).__name__,
        "num_labels": model.config.num_labels,
        "pad": model.config.pad_token_id,
        "loading": {k: sorted(v) for k, v in info.items() if v},
    }
save_file(tensors, job["out"])
report["lmforge_imported"] = any(m == "lmforge" or m.startswith("lmforge.") for m in sys.modules)
print(json.dumps(report))
"""


def test_llama_reward_model_loads_in_plain_transformers(tmp_path: Path, tokenizer: object) -> None:
    vocab, pad = len(tokenizer), tokenizer.pad_token_id  # type: ignore[arg-type, attr-defined]
    models = {
        "tied": reward_model(vocab, seed=1),
        "untied": reward_model(vocab, seed=2, tie_embeddings=False, n_kv_heads=1, bias=True),
    }
    dirs = {}
    for name, model in models.items():
        path = save_checkpoint(tmp_path / name, model, tokenizer, stage="reward", step=1)
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"] == "llama"
        assert config["architectures"] == ["LlamaForSequenceClassification"]
        assert config["num_labels"] == 1
        assert config["pad_token_id"] == pad
        assert json.loads((path / "lmforge.json").read_text())["head"] == "reward"
        keys = set(load_file(path / "model.safetensors"))
        assert "score.weight" in keys and "lm_head.weight" not in keys
        assert all(k == "score.weight" or k.startswith("model.") for k in keys)
        dirs[name] = str(path)

    padded = right_padded(vocab, pad)
    full = (padded[0].clone(), torch.ones_like(padded[1]))
    full[0][full[0] == pad] = 9  # no padding at all: every row is read at its last column
    batches = {"padded": padded, "full": full}
    out = tmp_path / "scores.safetensors"
    job = {
        "dirs": dirs,
        "batches": {k: (ids.tolist(), mask.tolist()) for k, (ids, mask) in batches.items()},
        "out": str(out),
    }
    report = plain_transformers(_PLAIN_TRANSFORMERS, job, tmp_path)
    theirs = load_file(out)
    for name, model in models.items():
        info = report[name]
        assert info["class"] == "LlamaForSequenceClassification"
        assert info["num_labels"] == 1
        assert info["pad"] == pad
        assert info["loading"] == {}  # no missing, unexpected or mismatched tensor
        for batch, (ids, mask) in batches.items():
            with torch.no_grad():
                mine = model(ids, mask)
            assert mine.abs().max() > 0.1
            hf = theirs[f"{name}.{batch}"]
            assert hf.shape == (3, 1)
            assert (hf.squeeze(-1) - mine).abs().max() < ATOL, (name, batch)


NON_LLAMA = {
    "alibi_layernorm": {"position": "alibi", "norm": "layernorm", "bias": True},
    "learned_untied_gelu": {"position": "learned", "tie_embeddings": False, "mlp": "gelu"},
}


@pytest.mark.parametrize("variant", list(NON_LLAMA))
def test_non_llama_reward_model_loads_with_auto_model(
    tmp_path: Path, tokenizer: object, variant: str
) -> None:
    vocab, pad = len(tokenizer), tokenizer.pad_token_id  # type: ignore[arg-type, attr-defined]
    model = reward_model(vocab, seed=5, **NON_LLAMA[variant])
    path = save_checkpoint(tmp_path / "rm", model, tokenizer, step=1)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "lmforge"
    assert config["architectures"] == ["LmforgeForSequenceClassification"]
    assert config["pad_token_id"] == pad
    keys = set(load_file(path / "model.safetensors"))
    assert "score.weight" in keys and "model.output.weight" not in keys

    hf, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    hf.eval()
    assert isinstance(hf, LmforgeForSequenceClassification)
    assert {k: v for k, v in info.items() if v} == {}
    assert hf.model.cfg == model.cfg
    ids, mask = right_padded(vocab, pad)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask).logits
        assert theirs.shape == (3, 1)
        assert (theirs.squeeze(-1) - model(ids, mask)).abs().max() < ATOL
        full = ids[2:]
        assert (hf(full).logits.squeeze(-1) - model(full)).abs().max() < ATOL


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_embeddings": False}, {"position": "alibi", "tie_embeddings": False}],
    ids=["llama_tied", "llama_untied", "lmforge_untied"],
)
def test_load_reward_model_round_trip_is_exact(
    tmp_path: Path, tokenizer: object, overrides: dict[str, object]
) -> None:
    vocab = len(tokenizer)  # type: ignore[arg-type]
    model = reward_model(vocab, seed=3, **overrides)
    path = save_checkpoint(tmp_path / "rm", model, tokenizer, stage="reward", step=7)
    loaded, tok, meta = load_reward_model(path)
    assert isinstance(loaded, RewardModel) and not loaded.training
    assert tok is not None
    assert meta["head"] == "reward" and meta["step"] == 7
    assert loaded.cfg == model.cfg
    assert_same_state(loaded, model)
    ids, mask = right_padded(vocab, tokenizer.pad_token_id)  # type: ignore[attr-defined]
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), model(ids, mask))

    # A collective save writes named_parameters() (no tied alias): the same files.
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    again = save_checkpoint(tmp_path / "rm2", model, tokenizer, state_dict=state, step=7)
    assert (
        load_file(again / "model.safetensors").keys()
        == load_file(path / "model.safetensors").keys()
    )

    # load_checkpoint gives the backbone GPT when it has an LM head (the tied embedding) ...
    if model.cfg.tie_embeddings:
        gpt, _, meta = load_checkpoint(path)
        assert isinstance(gpt, GPT) and meta["head"] == "reward"
        assert gpt.output.weight is gpt.tok_embeddings.weight
        for name, p in gpt.named_parameters():
            assert torch.equal(p, dict(model.backbone.named_parameters())[name]), name
    else:  # ... and says plainly when it has none
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        msg = str(err.value)
        assert "\n" not in msg and "load_reward_model" in msg and "model.safetensors" in msg


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_load_reward_model_from_a_causal_checkpoint_adds_a_fresh_head(
    tmp_path: Path, tokenizer: object, tied: bool
) -> None:
    vocab = len(tokenizer)  # type: ignore[arg-type]
    cfg = small_config(vocab_size=vocab, tie_embeddings=tied, init_std=0.2)
    sft = build_model(cfg, seed=4)
    path = save_checkpoint(tmp_path / "sft", sft, tokenizer, stage="sft", step=20)
    assert json.loads((path / "lmforge.json").read_text())["head"] == "lm"

    model, _, meta = load_reward_model(path, seed=9)
    assert meta["head"] == "lm" and meta["stage"] == "sft"  # what the file was
    backbone = dict(model.backbone.named_parameters())
    for name, p in sft.named_parameters():
        if name == "output.weight" and not tied:
            assert isinstance(model.backbone.output, NoLMHead)
            continue
        assert torch.equal(backbone[name], p), name
    head = model.score.weight
    assert head.shape == (1, cfg.dim) and head.abs().sum() > 0
    again, _, _ = load_reward_model(path, seed=9)
    other, _, _ = load_reward_model(path, seed=10)
    assert torch.equal(again.score.weight, head)
    assert not torch.equal(other.score.weight, head)


def test_reward_checkpoint_errors(tmp_path: Path, tokenizer: object) -> None:
    model = reward_model(len(tokenizer))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pad"):
        save_checkpoint(tmp_path / "no_tokenizer", model)
    assert not (tmp_path / "no_tokenizer").exists()
    assert not any(tmp_path.iterdir())  # no partial directory left behind

    path = save_checkpoint(tmp_path / "rm", model, tokenizer)
    meta = json.loads((path / "lmforge.json").read_text())
    (path / "lmforge.json").write_text(json.dumps({**meta, "head": "lm"}))
    with pytest.raises(CheckpointError) as err:
        load_reward_model(path)
    msg = str(err.value)
    assert "\n" not in msg and "config.json" in msg and "'reward'" in msg


def test_hf_llama_classifier_loads_as_a_reward_model(tmp_path: Path) -> None:
    """A reward model trained with transformers (no lmforge.json) is one of ours too."""
    config = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        num_labels=1,
        pad_token_id=2,
    )
    torch.manual_seed(3)
    hf = transformers.LlamaForSequenceClassification(config).eval()
    hf.save_pretrained(tmp_path)
    model, tok, meta = load_reward_model(tmp_path)
    assert tok is None and meta["head"] == "reward"
    ids, mask = right_padded(101, pad=2)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask).logits.squeeze(-1)
        assert theirs.abs().max() > 0.1
        assert (model(ids, mask) - theirs).abs().max() < ATOL

    config.num_labels = 2
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "two")
    with pytest.raises(CheckpointError, match="2 labels"):
        load_reward_model(tmp_path / "two")
