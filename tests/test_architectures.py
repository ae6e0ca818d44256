"""Models people already have: Llama (with RoPE scaling, split biases, odd head sizes), Qwen2 and
Mistral directories written by transformers load with transformers' logits, save back in their
own model_type, and load from a Hugging Face hub cache by name. All fp32 on CPU, tiny sizes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
import transformers
from safetensors.torch import load_file
from stagerun import plain_transformers
from transformers import AutoModelForCausalLM

from lmforge.checkpoint import (
    load_checkpoint,
    load_reward_model,
    resolve_checkpoint,
    save_checkpoint,
)
from lmforge.errors import CheckpointError
from lmforge.generate import GenerateConfig, generate
from lmforge.model import GPT
from lmforge.tokenizer import train_tokenizer

ATOL = 1e-4
VOCAB = 512
TEXTS = [f"the quick brown fox {i} jumps over the lazy dog, again and again." for i in range(40)]
REPO = Path(__file__).resolve().parents[1]


# These models are tiny: one intra-op thread is faster (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def one_line(err: pytest.ExceptionInfo[CheckpointError], *names: str) -> str:
    """The message of a raised CheckpointError, after checking it is one line naming `names`."""
    msg = str(err.value)
    assert "\n" not in msg, msg
    for name in names:
        assert name in msg, msg
    return msg


# ----------------------------------------------------------------- models built by transformers


def base_kwargs(**overrides: Any) -> dict[str, Any]:
    """A tiny GQA model: vocab 512, 2 layers, width 64, 4 query and 2 key/value heads."""
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
        rms_norm_eps=1e-6,
        initializer_range=0.1,
        tie_word_embeddings=True,
    )
    kwargs.update(overrides)
    return kwargs


# name -> (transformers config class, its arguments). Short RoPE bases put the rotary
# wavelengths (2π·θ^(2i/E): 6 to ~1400 tokens) on both sides of the scaling boundaries.
ARCHITECTURES: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "llama3": (
        transformers.LlamaConfig,
        base_kwargs(
            max_position_embeddings=128,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,  # kept < 8, blended 8..32, scaled > 32
            },
        ),
    ),
    "linear": (
        transformers.LlamaConfig,
        base_kwargs(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    ),
    "dynamic": (
        transformers.LlamaConfig,
        base_kwargs(max_position_embeddings=32, rope_scaling={"type": "dynamic", "factor": 2.0}),
    ),
    "untied_head_dim": (
        transformers.LlamaConfig,
        base_kwargs(tie_word_embeddings=False, head_dim=32, num_key_value_heads=1),
    ),
    "attention_bias": (transformers.LlamaConfig, base_kwargs(attention_bias=True)),
    "both_biases": (
        transformers.LlamaConfig,
        base_kwargs(attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    ),
    "qwen2": (transformers.Qwen2Config, base_kwargs(use_sliding_window=False)),
    "qwen2_long_window": (
        transformers.Qwen2Config,
        base_kwargs(use_sliding_window=True, sliding_window=64, max_window_layers=1),
    ),
    "mistral": (transformers.MistralConfig, base_kwargs(sliding_window=None)),
    "mistral_long_window": (transformers.MistralConfig, base_kwargs(sliding_window=64)),
}
EXPECTED = {  # name -> (model_type, rope_type, (q/k/v, o, mlp) biases)
    "llama3": ("llama", "llama3", (False, False, False)),
    "linear": ("llama", "linear", (False, False, False)),
    "dynamic": ("llama", "dynamic", (False, False, False)),
    "untied_head_dim": ("llama", "default", (False, False, False)),
    "attention_bias": ("llama", "default", (True, True, False)),
    "both_biases": ("llama", "default", (True, True, True)),
    "qwen2": ("qwen2", "default", (True, False, False)),
    "qwen2_long_window": ("qwen2", "default", (True, False, False)),
    "mistral": ("mistral", "default", (False, False, False)),
    "mistral_long_window": ("mistral", "default", (False, False, False)),
}


def random_hf(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """transformers' causal LM `name` with every weight random (norms and biases included,
    so that a norm or bias read from the wrong place would show)."""
    config_class, kwargs = ARCHITECTURES[name]
    config = config_class(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" in key:
                p.uniform_(0.5, 1.5)
            elif key.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


def inputs(length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (3, length), a left-padded attention mask, position ids counting real tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, length), generator=gen)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[0, :5] = 0  # left padding of 5
    mask[1, :1] = 0  # of 1; row 2 has none
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return ids, mask, positions


# Sequence lengths per model: beyond the original context of llama3 (32) and dynamic (32;
# transformers grows the base there), short ones around them. For dynamic NTK transformers keeps
# the frequencies of the longest sequence seen until a sequence within the original context
# resets them, so lengths run short, long, short, longer: each call then matches a fresh model.
LENGTHS = {"llama3": [12, 40], "dynamic": [12, 48, 20, 64], "linear": [12, 64]}


def compare(hf: transformers.PreTrainedModel, ours: GPT, lengths: list[int]) -> float:
    """Max |ours - transformers| over plain and left-padded batches of each length (padded
    positions excluded: garbage on both sides)."""
    worst = 0.0
    with torch.no_grad():
        for i, length in enumerate(lengths):
            ids, mask, positions = inputs(length, seed=i)
            theirs = hf(ids).logits
            assert theirs.abs().max() > 1.0  # near-zero logits would prove little
            worst = max(worst, max_diff(ours(ids), theirs))
            theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
            mine = ours(ids, attention_mask=mask, position_ids=positions)
            real = mask.bool()
            worst = max(worst, max_diff(mine[real], theirs[real]))
    return worst


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_hf_model_loads_with_same_logits(tmp_path: Path, name: str) -> None:
    hf = random_hf(name)
    hf.save_pretrained(tmp_path)
    ours, _, _ = load_checkpoint(tmp_path)
    model_type, rope_type, biases = EXPECTED[name]
    assert ours.cfg.family == model_type
    assert ours.cfg.rope_type == rope_type
    assert ours.cfg.linear_biases() == biases
    assert ours.cfg.tie_embeddings is hf.config.tie_word_embeddings
    if name == "dynamic":  # scaled from 32 positions, the context reaches factor times further
        assert (ours.cfg.rope_original_max_seq_len, ours.cfg.max_seq_len) == (32, 64)
    diff = compare(hf, ours, LENGTHS.get(name, [12]))
    print(f"{name}: max |diff| {diff:.2e}")
    assert diff < ATOL


@pytest.mark.parametrize("static", [False, True], ids=["dynamic_cache", "static_cache"])
def test_dynamic_rope_generation_crosses_the_original_context(tmp_path: Path, static: bool) -> None:
    """Greedy decoding with a KV cache from 26 tokens to 40, past the original 32: each step's
    frequencies follow the length so far (cached keys keep theirs), as in transformers. The
    log-probabilities are compared: random models repeat tokens whatever the positions."""
    hf = random_hf("dynamic")
    hf.save_pretrained(tmp_path)
    ours, _, _ = load_checkpoint(tmp_path)
    prompt = inputs(26)[0][2].tolist()
    greedy = GenerateConfig(temperature=0, max_new_tokens=14, static_cache=static)
    mine = generate(ours, [prompt], greedy)
    out = hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=14,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[:, len(prompt) :]  # (1, 14)
    assert tokens.tolist() == mine.tokens.tolist()
    logprobs = torch.stack(out.scores, 1).log_softmax(-1)  # (1, 14, V)
    theirs = logprobs.gather(-1, tokens[..., None])[..., 0]  # (1, 14)
    diff = max_diff(mine.logprobs, theirs)
    print(f"dynamic generation ({'static' if static else 'dynamic'} cache): {diff:.2e}")
    assert diff < ATOL


def test_rope_scaling_spelling_of_transformers_4(tmp_path: Path) -> None:
    """A config.json as transformers 4.x wrote it (`rope_scaling` with `type`, a top-level
    `rope_theta`) loads like transformers 5's `rope_parameters`."""
    hf = random_hf("llama3")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    config["rope_scaling"] = params
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours, _, _ = load_checkpoint(tmp_path)
    assert (ours.cfg.rope_type, ours.cfg.rope_theta, ours.cfg.rope_factor) == ("llama3", 500, 8)
    assert compare(hf, ours, LENGTHS["llama3"]) < ATOL


def test_bf16_weights_load_in_fp32(tmp_path: Path) -> None:
    hf = random_hf("llama3").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    ours, _, _ = load_checkpoint(tmp_path)  # fp32 by default
    assert ours.tok_embeddings.weight.dtype == torch.float32
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    diff = compare(theirs, ours, LENGTHS["llama3"])
    print(f"bf16 -> fp32: max |diff| {diff:.2e}")
    assert diff < ATOL


def test_vocabulary_padded_beyond_the_tokenizer(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(TEXTS, 300)
    assert len(tokenizer) < VOCAB  # the embedding has rows no token uses (padded to 512)
    hf = random_hf("qwen2")
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ours, tok, _ = load_checkpoint(tmp_path)
    assert tok is not None and len(tok) < ours.cfg.vocab_size == VOCAB
    ids = torch.tensor([tok("the lazy dog jumps again")["input_ids"]])
    with torch.no_grad():
        diff = max_diff(ours(ids), hf(ids).logits)
    print(f"padded vocabulary: max |diff| {diff:.2e}")
    assert diff < ATOL


# --------------------------------------------------------- lmforge -> plain transformers


_PLAIN_TRANSFORMERS = r"""
import json, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

job = json.loads(sys.argv[1])
report, tensors = {}, {}
for name, path in job["dirs"].items():
    auto = AutoModelForSequenceClassification if name.endswith("reward") else AutoModelForCausalLM
    model = auto.from_pretrained(path).eval()
    report[name] = {"class": type(model).__name__, "model_type": model.config.model_type}
    with torch.no_grad():  # in order: dynamic RoPE in transformers remembers the longest one
        for i, ids in enumerate(job["inputs"][name]):
            tensors[f"{name}.{i}"] = model(torch.tensor(ids)).logits.contiguous()
save_file(tensors, job["out"])
report["lmforge_imported"] = any(m == "lmforge" or m.startswith("lmforge.") for m in sys.modules)
print(json.dumps(report))
"""


def test_saved_in_own_model_type_and_loaded_by_plain_transformers(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(TEXTS, 300)
    names = ["llama3", "linear", "dynamic", "untied_head_dim", "attention_bias", "both_biases"]
    names += ["qwen2", "mistral"]
    models: dict[str, Any] = {}
    dirs: dict[str, str] = {}
    for name in names:
        random_hf(name).save_pretrained(tmp_path / "hf" / name)
        model, _, _ = load_checkpoint(tmp_path / "hf" / name)
        models[name] = model
        dirs[name] = str(save_checkpoint(tmp_path / name, model, tokenizer, step=1))
    for name in ("qwen2", "mistral"):  # reward models keep the family too
        reward, _, _ = load_reward_model(tmp_path / "hf" / name, seed=3)
        models[f"{name}_reward"] = reward
        dirs[f"{name}_reward"] = str(
            save_checkpoint(tmp_path / f"{name}_reward", reward, tokenizer)
        )

    gen = torch.Generator().manual_seed(0)
    pad = tokenizer.pad_token_id
    batches: dict[str, list[torch.Tensor]] = {}
    for name in dirs:
        lengths = LENGTHS.get(name, [12])
        batches[name] = [torch.randint(0, VOCAB, (3, n), generator=gen) for n in lengths]
        for ids in batches[name]:  # reward models score the last token that is not the pad
            ids[ids == pad] = pad + 1
    out = tmp_path / "logits.safetensors"
    job = {
        "dirs": dirs,
        "inputs": {k: [b.tolist() for b in v] for k, v in batches.items()},
        "out": str(out),
    }
    report = plain_transformers(_PLAIN_TRANSFORMERS, job, tmp_path)
    logits = load_file(out)

    for name, model in models.items():
        family = name.removesuffix("_reward")
        model_type = EXPECTED[family][0]
        prefix = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[model_type]
        arch = (
            f"{prefix}ForSequenceClassification"
            if name.endswith("reward")
            else f"{prefix}ForCausalLM"
        )
        config = json.loads((Path(dirs[name]) / "config.json").read_text())
        assert (config["model_type"], config["architectures"]) == (model_type, [arch])
        assert report[name] == {"class": arch, "model_type": model_type}
        if family == "llama3":  # rope scaling is in config.json, for transformers to apply
            assert config["rope_parameters"]["rope_type"] == "llama3"

        # lmforge loads its own output back: same architecture, same weights.
        loader = load_reward_model if name.endswith("reward") else load_checkpoint
        back, _, _ = loader(dirs[name])
        assert back.cfg == model.cfg
        for key, value in model.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key

        worst = 0.0
        with torch.no_grad():
            for i, ids in enumerate(batches[name]):
                mine = model(ids)[:, None] if name.endswith("reward") else model(ids)
                worst = max(worst, max_diff(logits[f"{name}.{i}"], mine))
        print(f"saved {name}: max |diff| {worst:.2e}")
        assert worst < ATOL


# ----------------------------------------------------------------------------- refused


def test_mistral_with_short_sliding_window_is_one_line_error(tmp_path: Path) -> None:
    config = transformers.MistralConfig(**base_kwargs(sliding_window=16))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    one_line(err, str(tmp_path / "config.json"), "sliding_window=16", "64")


def test_qwen2_with_short_sliding_window_is_one_line_error(tmp_path: Path) -> None:
    kwargs = base_kwargs(use_sliding_window=True, sliding_window=16, max_window_layers=1)
    AutoModelForCausalLM.from_config(transformers.Qwen2Config(**kwargs)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    one_line(err, str(tmp_path / "config.json"), "sliding_window=16")


@pytest.mark.parametrize(
    ("edit", "names"),
    [
        ({"model_type": "gpt_neox"}, ["model_type", "'gpt_neox'"]),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, ["rope_type", "'yarn'"]),
        ({"rope_parameters": {"rope_type": "linear"}}, ["rope_parameters.factor"]),
        ({"hidden_act": "gelu"}, ["hidden_act", "'gelu'"]),
    ],
    ids=["model_type", "yarn", "no_factor", "hidden_act"],
)
def test_unsupported_config_is_one_line_error(
    tmp_path: Path, edit: dict[str, Any], names: list[str]
) -> None:
    random_hf("qwen2").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    one_line(err, str(tmp_path / "config.json"), *names)


# ------------------------------------------------------------------------- hub names


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_hub_cache(cache: Path, repo_id: str, files_from: Path) -> Path:
    """Lay `files_from` out in a hub cache as huggingface_hub does: file contents in blobs/,
    the snapshot of commit COMMIT as relative symlinks to them, refs/main naming the commit.
    Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    for file in sorted(p for p in files_from.rglob("*") if p.is_file()):
        rel = file.relative_to(files_from)
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()  # LFS files' etag: their sha256
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache that huggingface_hub reads (offline, as the tests always are)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable when imported: point the imported copy there too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_name_loads_from_cache(tmp_path: Path, hub_cache: Path) -> None:
    hf = random_hf("qwen2")
    hf.save_pretrained(tmp_path / "model")
    snapshot = add_to_hub_cache(hub_cache, "org/tiny-qwen", tmp_path / "model")
    assert resolve_checkpoint("org/tiny-qwen") == snapshot
    ours, _, meta = load_checkpoint("org/tiny-qwen")
    assert meta["path"] == str(snapshot)
    assert compare(hf, ours, [12]) < ATOL

    # A run directory on the hub resolves to its latest checkpoint, like a local one.
    run = tmp_path / "run"
    save_checkpoint(run / "step-1", ours, step=1, update_latest=True)
    snapshot = add_to_hub_cache(hub_cache, "org/a-run", run)
    assert resolve_checkpoint("org/a-run") == snapshot / "step-1"
    again, _, meta = load_checkpoint("org/a-run")
    assert meta["step"] == 1
    assert compare(hf, again, [12]) < ATOL


def test_hub_name_missing_offline_is_one_line_error(hub_cache: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint("org/not-downloaded")
    one_line(err, "org/not-downloaded", "HF_HUB_OFFLINE", "download it first", "local path")


def test_hub_name_resolves_from_environment_alone(tmp_path: Path) -> None:
    """A new process finds the cache through HF_HUB_CACHE alone (as a stage's init_from)."""
    random_hf("mistral").save_pretrained(tmp_path / "model")
    cache = tmp_path / "hub"
    snapshot = add_to_hub_cache(cache, "org/tiny-mistral", tmp_path / "model")
    code = (
        "from lmforge.checkpoint import load_checkpoint\n"
        "model, _, meta = load_checkpoint('org/tiny-mistral')\n"
        "print(meta['path'], model.cfg.family)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(snapshot), "mistral"]
