"""Train or load a Hugging Face fast tokenizer; lmforge's special tokens and chat template.

A trained tokenizer is byte-level BPE (GPT-2 style, Radford et al. 2019) with digits split one per
token (as in Llama, Touvron et al. 2023, which helps arithmetic) and the eight special tokens below
at ids 0..7. Any text encodes without unknown tokens and decodes back to the same string. It adds
no tokens by itself: callers put BOS / EOS where they want them.

lmforge's own chat format is rendered two ways that give the same ids: `CHAT_TEMPLATE` (Jinja,
stored in tokenizer_config.json so that `transformers` and serving stacks use it) and `encode_chat`
(ours, no Jinja, which also returns the SFT loss mask)::

    <|bos|><|user|>\\nHi<|end|>\\n<|assistant|>\\nHello!<|end|>\\n

It is one format among others: stages train with whatever template the model's tokenizer carries
(lmforge.data.templates), and lmforge's marks each assistant turn's content and `<|end|>` with
`{% generation %}` so that transformers' `return_assistant_tokens_mask` (and TRL) find the tokens
to learn. Tokenizers saved before the markers existed carry `CHAT_TEMPLATE_V1`, which renders the
same ids.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmforge.config import option
from lmforge.errors import CheckpointError, ConfigError, DataError

BOS = "<|bos|>"  # start of a document or a chat
EOS = "<|eos|>"  # end of a document
PAD = "<|pad|>"  # padding; never learned (labels are masked)
MASK = "<|mask|>"  # masked-LM objectives replace tokens with it
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"  # end of a chat turn; generation stops on it
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, MASK, SYSTEM, USER, ASSISTANT, END)  # ids 0..7
ROLE_TOKENS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # the specials plus every byte
# The tokenizer does not know the model's context; stages set `model_max_length` to the model's
# max_seq_len before saving. Until then this only decides when transformers warns.
DEFAULT_MODEL_MAX_LENGTH = 2048
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# The template of tokenizers saved before the generation markers: same ids, no assistant mask.
CHAT_TEMPLATE_V1 = (
    "{{- '<|bos|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role: ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)
# {% generation %} wraps what SFT learns of an assistant turn: its content and the <|end|> that
# closes it (the newline after <|end|> is the template's, and never learned).
CHAT_TEMPLATE = (
    "{{- '<|bos|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role: ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] ~ '<|end|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- message['content'] ~ '<|end|>' -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# A hub id is "name" or "owner/name"; anything else that does not exist is a missing local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")


@dataclass
class TokenizerConfig:
    """Which tokenizer to use, or how to train one on the corpus."""

    path: str = option("", "local tokenizer directory or hub name; empty = train one on the corpus")
    vocab_size: int = option(4096, "size of a trained vocabulary, special tokens included")
    min_frequency: int = option(2, "a pair must occur this often to become a BPE merge")
    train_max_chars: int = option(20_000_000, "at most this many corpus characters train it")

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming `prefix.key` for a value that cannot work."""
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"{prefix}.vocab_size: {self.vocab_size} is too small; it needs at least "
                f"{MIN_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens + 256 bytes)"
            )
        if self.min_frequency < 1:
            raise ConfigError(f"{prefix}.min_frequency: {self.min_frequency} must be at least 1")
        if self.train_max_chars < 1:
            raise ConfigError(f"{prefix}.train_max_chars: {self.train_max_chars} must be positive")


def _checked_texts(
    texts: Iterable[str], seen: list[int], max_chars: int | None = None
) -> Iterator[str]:
    """Yield texts (at most max_chars characters in all), raising DataError on a non-string.

    Counts the characters yielded into seen[0].
    """
    for i, text in enumerate(texts):
        if max_chars is not None and seen[0] >= max_chars:
            return
        if not isinstance(text, str):
            raise DataError(
                f"tokenizer training text {i} is a {type(text).__name__}, not a str; "
                "the corpus must yield strings"
            )
        if max_chars is not None:
            text = text[: max_chars - seen[0]]
        seen[0] += len(text)
        yield text


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    *,
    max_chars: int | None = None,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`, with SPECIAL_TOKENS at ids 0..7.

    Only the first `max_chars` characters of the corpus train it, when given.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size: {vocab_size} is too small; it needs at least {MIN_VOCAB_SIZE}"
        )
    tokenizer = Tokenizer(models.BPE())  # no unk token: all 256 bytes are in the vocabulary
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # first, so they get ids 0..7
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = [0]
    tokenizer.train_from_iterator(_checked_texts(texts, seen, max_chars), trainer=trainer)
    if seen[0] == 0:
        raise DataError("the corpus is empty: there is no text to train the tokenizer on")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        mask_token=MASK,
        # transformers 5 calls these extra_special_tokens and still accepts this name.
        additional_special_tokens=[SYSTEM, USER, ASSISTANT, END],
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
        chat_template=CHAT_TEMPLATE,
    )


def _check_messages(messages: object) -> None:
    """Raise DataError unless messages is a non-empty list of {role, content} string mappings."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise DataError(
            f"chat messages must be a list of {{'role', 'content'}} mappings, "
            f"got a {type(messages).__name__}"
        )
    if not messages:
        raise DataError("chat messages are empty: a chat needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(f"chat message {i} is a {type(message).__name__}, not a mapping")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise DataError(f"chat message {i} has no string 'role' (got {role!r})")
        if role not in ROLE_TOKENS:
            raise DataError(
                f"chat message {i} has unknown role {role!r}; use one of {', '.join(ROLE_TOKENS)}"
            )
        if not isinstance(content, str):
            raise DataError(f"chat message {i} has no string 'content' (got {content!r})")


def encode_chat(
    tokenizer: PreTrainedTokenizerFast,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids of a chat in CHAT_TEMPLATE's format, and the mask of tokens SFT learns.

    The ids equal `tokenizer.apply_chat_template(messages, add_generation_prompt=...)` for a
    tokenizer from `train_tokenizer`. The mask is 1 on each assistant message's content and its
    closing `<|end|>`, 0 elsewhere (BOS, role tokens, the newline after them, other roles).
    A token that straddles the role newline and the content counts as content.

    Like transformers, a special token written inside a message's text is encoded as that special
    token: data that must not contain them is the caller's to clean.
    """
    _check_messages(messages)
    # Hugging Face splits text at special tokens and encodes each stretch between them on its own,
    # so encoding the same stretches one by one gives the same ids as encoding the rendered string.
    # Each piece is (text, learn_from): tokens ending after char learn_from are learned (None: no).
    pieces: list[tuple[str, int | None]] = [(BOS, None)]
    for message in messages:
        learn = message["role"] == "assistant"
        pieces.append((ROLE_TOKENS[message["role"]], None))
        pieces.append(("\n" + message["content"], 1 if learn else None))
        pieces.append((END, 0 if learn else None))
        pieces.append(("\n", None))
    if add_generation_prompt:
        pieces += [(ASSISTANT, None), ("\n", None)]
    encoded = tokenizer(
        [text for text, _ in pieces], add_special_tokens=False, return_offsets_mapping=True
    )
    ids: list[int] = []
    mask: list[int] = []
    for (text, learn_from), piece_ids, offsets in zip(
        pieces, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        if text in SPECIAL_TOKENS and len(piece_ids) != 1:
            raise ConfigError(
                f"tokenizer {tokenizer.name_or_path!r} has no special token {text}: encode_chat "
                "writes lmforge's own format; encode other tokenizers' chats with their template "
                "(lmforge.data.templates.ChatEncoder)"
            )
        ids += piece_ids
        if learn_from is None:
            mask += [0] * len(piece_ids)
        else:
            mask += [int(end > learn_from) for _, end in offsets]
    return ids, mask


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from a local Hugging Face directory, a checkpoint or run
    directory (its latest checkpoint's), or from the hub by name.

    A tokenizer without a pad token gets an existing token as pad (`fallback_pad_token`: eos, as
    is usual for GPT-2 / Llama tokenizers), never a new one, so the model keeps its vocabulary.
    So collators must mask padding by position (attention_mask), never by `id == pad_token_id`,
    or real EOS tokens would be dropped from the loss. The `eos_token_id` of a
    generation_config.json beside the tokenizer (a checkpoint's) is kept as
    `tokenizer.generation_eos_ids`: the ids that end generation, with the tokenizer's own.
    """
    local = Path(path).expanduser()
    name = str(path)
    if (local / "latest").is_file() and not (local / "tokenizer.json").is_file():
        from lmforge.checkpoint import resolve_checkpoint

        local = resolve_checkpoint(local)  # a run directory: its latest checkpoint's tokenizer
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"tokenizer path {local} is a file; give its directory instead")
        if not any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise CheckpointError(
                f"no tokenizer in {local}: it has neither tokenizer.json nor tokenizer_config.json"
            )
        source = str(local)
    elif _HUB_ID.match(name):
        source = name
    else:
        raise CheckpointError(f"tokenizer directory {local} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as err:  # transformers and tokenizers raise many types on bad files
        where = source if local.exists() else f"{source} (not a local directory; tried the hub)"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load the tokenizer {where}: {detail}") from err
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise CheckpointError(
            f"tokenizer {source} has no fast (tokenizer.json) version; lmforge needs one"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = fallback_pad_token(tokenizer)
    tokenizer.generation_eos_ids = generation_eos_ids(local) if local.is_dir() else []
    return tokenizer


def fallback_pad_token(tokenizer: PreTrainedTokenizerFast) -> str:
    """The existing token that pads batches for a tokenizer without a pad token: EOS, else BOS,
    else UNK, else the token of id 0.

    Never a new token, which would need a bigger embedding: padding is excluded by position
    (attention mask, labels of -100), so any id serves.
    """
    for token in (tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token):
        if token is not None:
            return str(token)
    return str(tokenizer.convert_ids_to_tokens(0))


def generation_eos_ids(directory: str | Path) -> list[int]:
    """The `eos_token_id` (one id or a list) of directory/generation_config.json; [] if the file
    or the key is missing, or the file is unreadable (it is advice to generate, not a contract)."""
    path = Path(directory) / "generation_config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> list[Path]:
    """Write TOKENIZER_FILES into directory, with the chat template inside tokenizer_config.json.

    transformers 5 writes the template to chat_template.jinja unless told otherwise, drops
    special_tokens_map.json and names the class and extra special tokens in ways transformers 4
    cannot read; this writes one layout that both load. Returns the paths written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory), save_jinja_files=False)
    # A template file left beside the config (by an older save) would override the one inside it.
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    shutil.rmtree(directory / "chat_templates", ignore_errors=True)

    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if isinstance(tokenizer.chat_template, str):  # save_pretrained put it there; make sure
        config["chat_template"] = tokenizer.chat_template
    extra = getattr(tokenizer, "extra_special_tokens", None)  # a list in transformers 5 ...
    if not isinstance(extra, (list, tuple)):  # ... a dict of other things in 4
        extra = getattr(tokenizer, "additional_special_tokens", None) or []
    extra = [str(token) for token in extra]
    config.pop("extra_special_tokens", None)  # transformers 4 wants a dict under that name
    if extra:
        config["additional_special_tokens"] = extra
    if config.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's generic class
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")

    special: dict[str, object] = {
        key: str(value)
        for key, value in tokenizer.special_tokens_map.items()
        if key != "additional_special_tokens" and value is not None
    }
    if extra:
        special["additional_special_tokens"] = extra
    text = json.dumps(special, indent=2, ensure_ascii=False) + "\n"
    (directory / "special_tokens_map.json").write_text(text, "utf-8")
    return [directory / name for name in TOKENIZER_FILES]


def build_tokenizer(
    cfg: TokenizerConfig, texts: Callable[[], Iterable[str]] | None
) -> PreTrainedTokenizerFast:
    """Load cfg.path if set, else train on texts() capped at cfg.train_max_chars characters."""
    if cfg.path:
        return load_tokenizer(cfg.path)
    if texts is None:
        raise ConfigError(
            "tokenizer.path is empty and there is no corpus to train a tokenizer on: "
            "set tokenizer.path to a tokenizer directory or hub name"
        )
    return train_tokenizer(
        texts(), cfg.vocab_size, cfg.min_frequency, max_chars=cfg.train_max_chars
    )
