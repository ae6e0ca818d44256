"""Tokenizer: training, special tokens, chat template vs encode_chat, save / load."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.tokenizer import (
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    CHAT_TEMPLATE_V1,
    END,
    EOS,
    MASK,
    MIN_VOCAB_SIZE,
    PAD,
    SPECIAL_TOKENS,
    TOKENIZER_FILES,
    TokenizerConfig,
    build_tokenizer,
    encode_chat,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

VOCAB = 600
_WORDS = (
    "the a an of to and in is was for on that with as by at from this it be are were model "
    "train data token text learn small large number year city river house people time day "
    "water light music story garden window morning evening quickly slowly never always café "
    "naïve über résumé"
)
WORDS = _WORDS.split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """English-like sentences with numbers and punctuation, some in two paragraphs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
        words.insert(rng.randint(0, len(words)), str(rng.randint(0, 99999)))
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ", then 42."]))
    return [s + ("\n\n" + rng.choice(out) if rng.random() < 0.3 else "") for s in out]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return train_tokenizer(corpus(), vocab_size=VOCAB, min_frequency=2)


@pytest.fixture(scope="module")
def saved(tok: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, directory)
    return directory


def hf_chat_ids(tokenizer: PreTrainedTokenizerFast, messages: list, gen: bool) -> list[int]:
    """transformers 5 returns a BatchEncoding (return_dict defaults to True); 4 returned a list."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\n\nlines\r\n",
    "Crème brûlée, naïve café, Ångström, Œuvre, straße",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷🇯🇵",
    "日本語のテキスト、中文，한국어 and Ελληνικά, русский",
    "combining e\u0301 vs é, zero\u200bwidth",
    "numbers 3.14159 and -42 and 1,000,000",
    "a , b . c 's don't  x",
    "special <|end|> inside <|user|> text",
    "",
]

CHATS = {
    "user": [{"role": "user", "content": "What is 12 + 30?"}],
    "system": [
        {"role": "system", "content": "You are a helpful model."},
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "The river by the city, 2024 km long."},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! 😀 Café?"},
        {"role": "user", "content": "  spaced out  "},
        {"role": "assistant", "content": " leading space and\ttab"},
        {"role": "user", "content": "Thanks\n"},
        {"role": "assistant", "content": "Über gern.\n"},
    ],
    "edges": [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "\n\n\nstarts with newlines"},
        {"role": "user", "content": "has <|end|> and <|assistant|> inside"},
        {"role": "assistant", "content": ""},
    ],
}


def test_special_tokens_have_fixed_single_ids(tok: PreTrainedTokenizerFast) -> None:
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(special) == i
        assert tok.encode(special, add_special_tokens=False) == [i]
        assert tok.encode(f"x{special}y", add_special_tokens=False).count(i) == 1
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.mask_token) == (BOS, EOS, PAD, MASK)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) == (0, 1, 2, 3)
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    assert MIN_VOCAB_SIZE < len(tok) <= VOCAB
    assert tok.encode("plain text") == tok.encode("plain text", add_special_tokens=False)


def test_digits_are_one_per_token(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode("12345", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == list("12345")
    ids = tok.encode("in 2024 there were 99 rivers", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()] == list("202499")


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_any_text(tok: PreTrainedTokenizerFast, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == text


def test_chat_template_renders_the_documented_format(tok: PreTrainedTokenizerFast) -> None:
    text = tok.apply_chat_template(CHATS["system"], tokenize=False, add_generation_prompt=False)
    assert text == (
        "<|bos|><|system|>\nYou are a helpful model.<|end|>\n<|user|>\nName a river.<|end|>\n"
        "<|assistant|>\nThe river by the city, 2024 km long.<|end|>\n"
    )
    text = tok.apply_chat_template(CHATS["user"], tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|user|>\nWhat is 12 + 30?<|end|>\n<|assistant|>\n"


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("name", list(CHATS))
def test_encode_chat_matches_transformers(tok: PreTrainedTokenizerFast, name: str, gen: bool):
    ids, mask = encode_chat(tok, CHATS[name], add_generation_prompt=gen)
    assert ids == hf_chat_ids(tok, CHATS[name], gen)
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    assert ids[0] == tok.convert_tokens_to_ids(BOS)
    if gen:
        assert ids[-2:] == [tok.convert_tokens_to_ids(ASSISTANT), tok.encode("\n")[0]]
        assert mask[-2:] == [0, 0]


def masked_runs(tok: PreTrainedTokenizerFast, ids: list[int], mask: list[int]) -> list[str]:
    """Decode each maximal run of mask == 1."""
    runs: list[list[int]] = []
    for i, (token, m) in enumerate(zip(ids, mask, strict=True)):
        if m and (i == 0 or not mask[i - 1]):
            runs.append([])
        if m:
            runs[-1].append(token)
    return [tok.decode(run) for run in runs]


@pytest.mark.parametrize("name", ["user", "system", "multi_turn"])
def test_assistant_mask_is_content_and_end(tok: PreTrainedTokenizerFast, name: str) -> None:
    messages = CHATS[name]
    ids, mask = encode_chat(tok, messages, add_generation_prompt=False)
    expected = [m["content"] + END for m in messages if m["role"] == "assistant"]
    assert masked_runs(tok, ids, mask) == expected
    assistant_id = tok.convert_tokens_to_ids(ASSISTANT)
    for i, token in enumerate(ids):
        if token == assistant_id:
            assert mask[i] == 0 and mask[i + 1] == 0  # the role token and its newline
    assert sum(mask) == sum(len(tok.encode(e, add_special_tokens=False)) for e in expected)


def test_mask_keeps_a_straddling_newline_with_the_content(tok: PreTrainedTokenizerFast) -> None:
    # The corpus has "\n\n", so the template's "\n" after <|assistant|> and the content's first
    # "\n" become one token: it is learned, as the content's first token.
    ids, mask = encode_chat(tok, CHATS["edges"])
    assert masked_runs(tok, ids, mask) == ["\n\n\n\nstarts with newlines" + END, END]


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("name", list(CHATS))
def test_mask_equals_transformers_generation_mask(
    tok: PreTrainedTokenizerFast, name: str, gen: bool
) -> None:
    # lmforge's own template marks the assistant's part with {% generation %}
    out = tok.apply_chat_template(
        CHATS[name],
        add_generation_prompt=gen,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert (out["input_ids"], out["assistant_masks"]) == encode_chat(tok, CHATS[name], gen)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "tool", "content": "x"}], "unknown role 'tool'"),
        ("hello", "must be a list"),
        ({"role": "user", "content": "x"}, "must be a list"),
        ([], "empty"),
        (["hi"], "message 0 is a str"),
        ([{"role": "user", "content": "x"}, {"content": "y"}], "message 1 has no string 'role'"),
        ([{"role": "user"}], "no string 'content'"),
        ([{"role": "user", "content": 3}], "no string 'content'"),
    ],
)
def test_bad_messages_raise_data_error(tok: PreTrainedTokenizerFast, messages, match) -> None:
    with pytest.raises(DataError, match=match):
        encode_chat(tok, messages)


def test_template_rejects_unknown_role(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(Exception, match="unknown chat role: tool"):  # jinja2 TemplateError
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_encode_chat_needs_chat_tokens() -> None:
    backend = Tokenizer(models.BPE())  # byte-level, but without lmforge's special tokens
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens(pre_tokenizers.ByteLevel.alphabet())
    foreign = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="Ā")
    with pytest.raises(ConfigError, match="has no special token <\\|bos\\|>"):
        encode_chat(foreign, CHATS["user"])


def test_save_writes_three_files_with_template_inside(saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == sorted(TOKENIZER_FILES)
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    special = json.loads((saved / "special_tokens_map.json").read_text())
    assert special["bos_token"] == BOS and special["pad_token"] == PAD
    assert special["additional_special_tokens"] == list(SPECIAL_TOKENS[4:])


@pytest.mark.parametrize("loader", ["auto", "lmforge"])
def test_save_load_round_trip(tok: PreTrainedTokenizerFast, saved: Path, loader: str) -> None:
    loaded = AutoTokenizer.from_pretrained(saved) if loader == "auto" else load_tokenizer(saved)
    assert loaded.chat_template == CHAT_TEMPLATE
    for i, special in enumerate(SPECIAL_TOKENS):
        assert loaded.encode(special, add_special_tokens=False) == [i]
    assert loaded.pad_token == PAD and loaded.mask_token == MASK and len(loaded) == len(tok)
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    for messages in CHATS.values():
        assert hf_chat_ids(loaded, messages, True) == hf_chat_ids(tok, messages, True)
        assert encode_chat(loaded, messages) == encode_chat(tok, messages)


def test_save_removes_a_stale_template_file(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text("{{ 'stale' }}")
    save_tokenizer(tok, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TOKENIZER_FILES)
    assert load_tokenizer(tmp_path).chat_template == CHAT_TEMPLATE


def test_load_sets_pad_to_eos(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    no_pad = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token=EOS)
    no_pad.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == EOS and loaded.pad_token_id == loaded.eos_token_id == 1


def test_load_missing_or_empty_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(CheckpointError, match=str(missing)):
        load_tokenizer(missing)
    with pytest.raises(CheckpointError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)


def test_build_tokenizer_loads_or_trains(saved: Path) -> None:
    loaded = build_tokenizer(TokenizerConfig(path=str(saved)), None)
    assert loaded.chat_template == CHAT_TEMPLATE
    with pytest.raises(ConfigError, match=r"tokenizer\.path"):
        build_tokenizer(TokenizerConfig(), None)

    pulled = []

    def texts() -> Iterator[str]:
        for i, text in enumerate(corpus(1000, seed=1)):
            pulled.append(i)
            yield text

    cfg = TokenizerConfig(vocab_size=300, train_max_chars=2000)
    trained = build_tokenizer(cfg, texts)
    assert trained.convert_tokens_to_ids(END) == 7 and len(trained) <= 300
    assert len(pulled) < 60  # stopped near 2000 characters, not at the end of 1000 sentences


def test_training_input_errors() -> None:
    with pytest.raises(DataError, match="empty"):
        train_tokenizer([], vocab_size=MIN_VOCAB_SIZE)
    with pytest.raises(DataError, match="text 1 is a int"):
        train_tokenizer(["ok", 3], vocab_size=MIN_VOCAB_SIZE)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(["ok"], vocab_size=100)


def test_config_fields_and_validation() -> None:
    for field in dataclasses.fields(TokenizerConfig):
        assert field.metadata["doc"]
    TokenizerConfig().validate("tokenizer")
    bad = {"vocab_size": MIN_VOCAB_SIZE - 1, "min_frequency": 0, "train_max_chars": 0}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=rf"^tokenizer\.{key}: "):
            TokenizerConfig(**{key: value}).validate("tokenizer")
    TokenizerConfig(vocab_size=MIN_VOCAB_SIZE).validate("tokenizer")


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("name", list(CHATS))
def test_chat_template_marks_what_encode_chat_learns(
    tok: PreTrainedTokenizerFast, name: str, gen: bool
) -> None:
    # CHAT_TEMPLATE's own {% generation %} markers: transformers' mask is lmforge's, and the ids
    # are those of the template saved before the markers.
    out = tok.apply_chat_template(
        CHATS[name], add_generation_prompt=gen, return_dict=True, return_assistant_tokens_mask=True
    )
    assert (out["input_ids"], out["assistant_masks"]) == encode_chat(tok, CHATS[name], gen)
    old = tok.apply_chat_template(
        CHATS[name], chat_template=CHAT_TEMPLATE_V1, add_generation_prompt=gen
    )
    assert hf_chat_ids(tok, CHATS[name], gen) == list(old["input_ids"])


def test_load_keeps_generation_eos_ids_and_pads_without_a_new_token(
    tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    save_tokenizer(tok, tmp_path / "with")
    (tmp_path / "with" / "generation_config.json").write_text('{"eos_token_id": [1, 7]}')
    assert load_tokenizer(tmp_path / "with").generation_eos_ids == [1, 7]
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token=BOS)
    no_eos.save_pretrained(tmp_path / "bos")
    loaded = load_tokenizer(tmp_path / "bos")
    assert loaded.pad_token == BOS and len(loaded) == len(tok)  # an existing token pads
    assert loaded.generation_eos_ids == []


def test_a_run_directory_gives_its_latest_checkpoints_tokenizer(tmp_path) -> None:
    """tokenizer.path (and every tokenizer load) takes a run directory like a checkpoint one."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.model import ModelConfig, build_model
    from lmforge.tokenizer import load_tokenizer, train_tokenizer

    tok = train_tokenizer(["a run directory holds checkpoints"] * 20, vocab_size=300)
    cfg = ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32)
    save_checkpoint(tmp_path / "step-000001", build_model(cfg, seed=0), tok, update_latest=True)
    loaded = load_tokenizer(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab() and loaded.chat_template == tok.chat_template
