"""Finetuning data: the builtin tasks or users' chat / preference files, checked and normalised.

A source is `builtin` (lmforge.data.tasks), local .jsonl/.json/.parquet files (a file, directory
or glob, resolved as for pretraining) or a hub dataset `owner/name[:split]`, read with `datasets`.
Records may be written three ways (`format: auto` tells them apart by their fields)::

    messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    prompt_completion  {"prompt": str | messages, "completion": str}
    preference         {"prompt": str | messages, "chosen": X, "rejected": X}
                       X = the answer text, [assistant message], or the whole chat ending with it
                       (then "prompt" may be left out: it is the messages before the answer)

and are normalised to SFT records {"messages", "answer"} (answer: a reference answer or None) or
preference records {"prompt": messages, "chosen": str, "rejected": str}; a string "task" field is
kept. Any bad record stops loading with one line naming the file and the record, e.g.
`data.jsonl record 17 (line 18): message 2 has unknown role 'bot'; use system, user or assistant`.

Records become token rows with the model's own chat template (lmforge.data.templates);
`chat_tokenizer` makes a stage's tokenizer the one it trains with and saves (`data.chat_template`
gives it a template or replaces its own).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import datasets
import numpy as np
from transformers import PreTrainedTokenizerFast

from lmforge.config import option
from lmforge.data.chat_datasets import PreferenceDataset, PromptDataset, SFTDataset
from lmforge.data.config import (
    MAX_RECORD_BYTES,
    DataConfig,
    check_entry,
    source_name,
    validate_mixture,
)
from lmforge.data.corpus import doc_hash, quiet_datasets, validation_mask
from lmforge.data.diagnose import _json_records
from lmforge.data.sampler import MixtureSampler
from lmforge.data.sources import resolve_source
from lmforge.data.tasks import TASKS, preference_pairs, task_examples
from lmforge.data.templates import NAMED_TEMPLATES, check_template_value, use_chat_template
from lmforge.errors import ConfigError, DataError
from lmforge.runtime import global_means
from lmforge.tokenizer import ROLE_TOKENS, SPECIAL_TOKENS

log = logging.getLogger(__name__)
Format = Literal["auto", "messages", "prompt_completion", "preference"]
Record = dict[str, Any]
SOURCE_KEY = "source"  # a mixture's held-out records: the name of the source each came from
_NEEDS = {  # the fields each format requires ("prompt" of preference data is optional)
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("chosen", "rejected"),
}


@dataclass
class ChatSourceConfig:
    """One source of a finetuning mixture; unset fields take the data section's values."""

    SHORTHAND: ClassVar[str] = "source"  # `sources: [a.jsonl, builtin]`: equal weights

    source: str = option(doc="'builtin', a local .jsonl/.json/.parquet file, directory or glob")
    weight: float = option(1.0, "share of training records drawn from it (relative to the others)")
    name: str = option("", "its name in logs; empty = from the path")
    format: Format | None = option(None, "record format; null = data.format")
    heldout_source: str | None = option(None, "its held-out data; null = data.heldout_source")
    heldout_fraction: float | None = option(
        None, "share of it held out without heldout_source; null = data.heldout_fraction"
    )

    def label(self) -> str:
        """The source's name."""
        return self.name or source_name(self.source)

    def validate(self, prefix: str = "data.sources[0]") -> None:
        """Raise ConfigError naming `prefix.key` for a value that cannot work."""
        check_entry(self.source, self.weight, self.name, prefix)
        fraction = self.heldout_fraction
        if fraction is not None and not 0.0 <= fraction < 1.0:
            raise ConfigError(f"{prefix}.heldout_fraction: must be in [0, 1), got {fraction}")


@dataclass
class ChatDataConfig:
    """Finetuning data: where chats or preference pairs come from and how they become rows."""

    source: str = option(
        "builtin",
        "'builtin' (generated tasks), a local .jsonl/.json/.parquet file, directory or glob, "
        "or a hub dataset 'owner/name[:split]'",
    )
    sources: list[ChatSourceConfig] = option(
        doc="a weighted mixture instead of `source`: a list of {source, weight, name, format, "
        "heldout_source, heldout_fraction} (unset keys take this section's values); training "
        "records are drawn by weight, each source keeps its own held-out records",
        default_factory=list,
    )
    heldout_source: str = option(
        "", "held-out data, as source; empty = builtin held-out tasks or a split of source"
    )
    heldout_fraction: float = option(
        0.05, "share of a user source held out (by a hash of each prompt) without heldout_source"
    )
    format: Format = option("auto", "record format; auto = detect from the fields")
    num_train: int = option(4000, "training examples generated by the builtin source")
    num_heldout: int = option(200, "held-out examples generated by the builtin source")
    seq_len: int = option(128, "tokens per row; longer records are skipped (and counted)")
    pack: bool = option(True, "pack several SFT samples into each row (else one, padded)")
    seed: int = option(0, "seed of the builtin data")
    max_record_bytes: int = option(
        MAX_RECORD_BYTES, "longest line (one JSON record) a .jsonl/.json file may have"
    )
    tasks: list[str] = option(doc="builtin tasks to use; empty = all", default_factory=list)
    chat_template: str = option(
        "",
        "chat template to train and save with instead of the tokenizer's own: a Jinja file or "
        f"one of {', '.join(NAMED_TEMPLATES)}; empty = the tokenizer's",
    )

    def validate(self, prefix: str = "data") -> None:
        """Raise ConfigError naming `prefix.key` for a value that cannot work."""
        p = f"{prefix}." if prefix else ""
        if not self.source.strip():
            raise ConfigError(f"{p}source: must not be empty (use 'builtin' for the default)")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(
                f"{p}heldout_fraction: must be in [0, 1), got {self.heldout_fraction}"
            )
        for key, low in (
            ("num_train", 1),
            ("num_heldout", 0),
            ("seq_len", 8),
            ("max_record_bytes", 1),
        ):
            if getattr(self, key) < low:
                raise ConfigError(f"{p}{key}: must be at least {low}, got {getattr(self, key)}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"{p}seed: must be in [0, 2**63), got {self.seed}")
        for name in self.tasks:
            if name not in TASKS:
                raise ConfigError(
                    f"{p}tasks: unknown task '{name}'; choose from {', '.join(TASKS)}"
                )
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"{p}tasks: a task is listed twice: {self.tasks}")
        if self.sources:
            validate_mixture(self.source, self.sources, p)
        used = [self.source, self.heldout_source, *(s.source for s in self.sources)]
        used += [s.heldout_source or "" for s in self.sources]
        if self.tasks and "builtin" not in {u.strip() for u in used}:
            # tasks filters the builtin generator; a user's own records have no tasks to pick
            raise ConfigError(
                f"{p}tasks: selects builtin tasks ({', '.join(self.tasks)}), but {p}source is "
                f"'{self.source}' and {p}heldout_source is not builtin; with your own data set "
                f"--{p}tasks=[] (or `tasks: []` in the config's data section)"
            )
        check_template_value(self.chat_template, f"{p}chat_template")

    def for_source(self, index: int) -> ChatDataConfig:
        """This section as a single-source config of mixture source `index`."""
        src = self.sources[index]
        fraction = src.heldout_fraction
        held = self.heldout_source if src.heldout_source is None else src.heldout_source
        builtin = "builtin" in (src.source.strip(), held.strip())
        return replace(
            self,
            source=src.source,
            sources=[],
            tasks=self.tasks if builtin else [],  # they select builtin tasks only
            format=self.format if src.format is None else src.format,
            heldout_source=held,
            heldout_fraction=self.heldout_fraction if fraction is None else fraction,
        )


# --- reading ------------------------------------------------------------------------------------


@dataclass
class RawRecords:
    """The records of one source as read, and where each came from."""

    name: str
    records: list[Any]
    where: Callable[[int], str]  # record index -> "data.jsonl record 3 (line 4)"


def _kind(value: Any) -> str:
    """How a JSON value reads in an error message: 'a number', 'null', 'a list'."""
    if value is None:
        return "null"
    names = {bool: "a bool", int: "a number", float: "a number", str: "a string", list: "a list"}
    return names.get(type(value), "an object" if isinstance(value, dict) else type(value).__name__)


def _line_numbers(path: Path) -> list[int]:
    """1-based numbers of the non-blank lines of a JSON Lines file: its records' lines."""
    with open(path, encoding="utf-8") as fh:
        return [n for n, line in enumerate(fh, 1) if line.strip()]


def _file_where(path: Path) -> Callable[[int], str]:
    """record index -> "data.jsonl record 3 (line 4)" (no line for a JSON array or parquet)."""
    lines: list[int] = []
    is_lines = path.suffix.lower() == ".jsonl"
    if path.suffix.lower() == ".json":
        with open(path, encoding="utf-8") as fh:
            is_lines = not fh.read(1 << 16).lstrip().startswith("[")

    def where(i: int) -> str:
        if is_lines and not lines:
            lines.extend(_line_numbers(path))  # only read again when there is an error to report
        return f"{path} record {i}" + (f" (line {lines[i]})" if i < len(lines) else "")

    return where


def _read_file(path: Path, builder: str, cache_dir: str) -> list[Any]:
    """A file's records as Python objects: JSON in plain Python (records may mix types, which
    pyarrow refuses, and its JSON reader can crash on some inputs), parquet through `datasets`."""
    if builder == "json":
        return [record for _, record in _json_records(path)]  # DataError names a bad line
    if _parquet_rows(path) == 0:
        return []  # datasets fails on it with an obscure message; the caller says "no records"
    logger = datasets.utils.logging.get_logger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # it logs each reader error; we report it once, better
    try:
        ds = datasets.load_dataset(
            builder, data_files=[str(path)], split="train", cache_dir=cache_dir
        )
        return ds.to_list()
    except Exception as err:  # datasets wraps reader errors in many types
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: datasets cannot read it ({detail}); re-export it") from err
    finally:
        logger.setLevel(level)


def _parquet_rows(path: Path) -> int | None:
    """The row count in a parquet file's footer (None if it cannot be read: datasets reports)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return int(pq.read_metadata(path).num_rows)
    except (OSError, pa.ArrowException):
        return None


def read_records(
    source: str, key: str = "data.source", max_record_bytes: int = MAX_RECORD_BYTES
) -> RawRecords:
    """Read every record of a local or hub source (not `builtin`); `key` names it in errors."""
    source = source.strip()
    try:  # a hub name with ":split" is no local path, so it resolves as "hub"
        resolved = resolve_source(DataConfig(source=source, max_record_bytes=max_record_bytes))
    except DataError as err:  # its messages are about pretraining's data.source
        text = str(err).replace("data.source", key).replace("add documents", "add records")
        raise DataError(text) from None
    with quiet_datasets():
        if resolved.kind == "hub":
            name, _, split = source.partition(":")
            try:
                ds = datasets.load_dataset(name, split=split or "train")
            except Exception as err:  # network, auth, missing split: all reported the same way
                first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                raise DataError(
                    f"{key} '{source}': not a local path, and loading it as a hub dataset failed "
                    f"({first}); check the path or the dataset name"
                ) from err
            records = ds.to_list()
            return RawRecords(source, records, lambda i: f"hub dataset '{source}' record {i}")
        if resolved.builder == "text":
            raise DataError(
                f"{key} '{source}': .txt files hold plain text, not chats; "
                "use .jsonl, .json or .parquet records"
            )
        records: list[Any] = []
        spans: list[tuple[int, Callable[[int], str]]] = []  # (first record, its file's where)
        with tempfile.TemporaryDirectory(prefix="lmforge-chat-") as cache:
            for path in resolved.files:
                part = _read_file(path, resolved.builder, cache)
                if not part:
                    raise DataError(f"{path}: the file has no records; add records or remove it")
                spans.append((len(records), _file_where(path)))
                records += part

    def where(i: int) -> str:
        start, at = next((s, w) for s, w in reversed(spans) if s <= i)
        return at(i - start)

    return RawRecords(source, records, where)


# --- checking and normalising -------------------------------------------------------------------


def _text(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} is {_kind(value)}, not a string")
    try:  # JSON can escape half of a surrogate pair ("\ud800"): no tokenizer can encode it
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(
            f"{where}: {what} holds an unpaired surrogate ({value[err.start]!r} at character "
            f"{err.start}), which is not text; fix the escape in the file"
        ) from None
    special = next((t for t in SPECIAL_TOKENS if t in value), None)
    if special is not None:
        raise DataError(
            f"{where}: {what} contains the special token {special}, which would break the chat "
            "format; remove it from the text"
        )
    return value


def _messages(value: Any, field: str, where: str) -> list[dict[str, str]]:
    """A checked copy of a list of {role, content} messages (other keys are dropped)."""
    if not isinstance(value, list):
        raise DataError(f"{where}: '{field}' is {_kind(value)}, not a list of messages")
    if not value:
        raise DataError(f"{where}: '{field}' is an empty list; a chat needs messages")
    name = "message" if field == "messages" else f"{field} message"
    out = []
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: {name} {j} is {_kind(message)}, not a {{role, content}}")
        role = message.get("role")
        if role is None:
            fields = ", ".join(k for k, v in message.items() if v is not None) or "none"
            raise DataError(f"{where}: {name} {j} has no 'role' (its fields: {fields})")
        if not isinstance(role, str):
            raise DataError(
                f"{where}: {name} {j} has a role that is {_kind(role)}, not a string; use "
                "system, user or assistant"
            )
        if role not in ROLE_TOKENS:
            raise DataError(
                f"{where}: {name} {j} has unknown role {role!r}; use system, user or assistant"
            )
        if message.get("content") is None:
            raise DataError(f"{where}: {name} {j} has no 'content'")
        content = _text(message["content"], f"the content of {name} {j}", where)
        out.append({"role": role, "content": content})
    return out


def _prompt(value: Any, where: str) -> list[dict[str, str]]:
    """A prompt given as text (one user message) or as messages not ending with an answer."""
    messages = (
        [{"role": "user", "content": _text(value, "'prompt'", where)}]
        if isinstance(value, str)
        else _messages(value, "prompt", where)
    )
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: 'prompt' ends with an assistant message; end it with the user's")
    return messages


def _response(value: Any, field: str, where: str) -> tuple[list[dict[str, str]], str]:
    """(messages before the answer, the answer) of a completion / chosen / rejected value."""
    if isinstance(value, str):
        return [], _text(value, f"'{field}'", where)
    if not isinstance(value, list):
        raise DataError(
            f"{where}: '{field}' is {_kind(value)}; give the answer as a string or as messages"
        )
    messages = _messages(value, field, where)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message of '{field}' must be the assistant's answer")
    return messages[:-1], messages[-1]["content"]


def _check_fields(record: Any, fmt: str, where: str) -> Record:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with fields, got {_kind(record)}")
    missing = [f for f in _NEEDS[fmt] if record.get(f) is None]
    if missing:
        fields = ", ".join(k for k, v in record.items() if v is not None) or "none"
        names = " and ".join(f"'{f}'" for f in missing)
        raise DataError(
            f"{where}: missing field {names} (its fields: {fields}); {fmt} records need "
            + ", ".join(_NEEDS[fmt])
        )
    return record


# Fields with a meaning of their own; any other field of a record is handed to reward functions.
_KNOWN_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected", "answer", "task")


def _extras(record: Record, where: str) -> Record:
    """The optional string fields "answer" and "task" that a record may carry, and under
    "fields" every other field it has (e.g. `tests`, `solution`: reward functions receive them
    as keyword lists)."""
    out: Record = {"answer": None}
    for key in ("answer", "task"):
        if record.get(key) is not None:
            out[key] = _text(record[key], f"'{key}'", where)
    fields = {k: v for k, v in record.items() if k not in _KNOWN_FIELDS}
    if fields:
        out["fields"] = fields
    return out


def _answer_prompt(record: Record, field: str, where: str) -> tuple[list[dict[str, str]], str]:
    """(prompt, answer) of a prompt_completion or preference record's `field`."""
    prefix, answer = _response(record[field], field, where)
    if record.get("prompt") is None:
        if not prefix:
            raise DataError(
                f"{where}: missing field 'prompt'; '{field}' is the answer alone, so the record "
                "needs the prompt it answers"
            )
        if prefix[-1]["role"] == "assistant":
            raise DataError(f"{where}: '{field}' has two assistant messages at its end")
        return prefix, answer
    prompt = _prompt(record["prompt"], where)
    if prefix and prefix != prompt:
        raise DataError(
            f"{where}: '{field}' does not start with the prompt; give the answer alone or the "
            "prompt's messages followed by the answer"
        )
    return prompt, answer


def sft_record(record: Any, fmt: str, where: str) -> Record:
    """A checked SFT record {"messages", "answer"[, "task"]} (preference data: prompt + chosen)."""
    record = _check_fields(record, fmt, where)
    if fmt == "messages":
        messages = _messages(record["messages"], "messages", where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(
                f"{where}: no assistant message, so nothing to learn; add the assistant's reply"
            )
    else:
        field = "completion" if fmt == "prompt_completion" else "chosen"
        prompt, answer = _answer_prompt(record, field, where)
        messages = [*prompt, {"role": "assistant", "content": answer}]
    return {"messages": messages, **_extras(record, where)}


def preference_record(record: Any, where: str) -> Record:
    """A checked preference record {"prompt", "chosen", "rejected"[, "answer", "task"]}."""
    record = _check_fields(record, "preference", where)
    prompt, chosen = _answer_prompt(record, "chosen", where)
    other, rejected = _answer_prompt(record, "rejected", where)
    if other != prompt:
        raise DataError(f"{where}: 'chosen' and 'rejected' answer different prompts")
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same text; a pair needs two")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **_extras(record, where)}


def detect_format(raw: RawRecords) -> str:
    """The record format of a source from its fields: preference, messages or prompt_completion."""
    fields: set[str] = set()
    for record in raw.records:
        if isinstance(record, dict):
            fields.update(k for k, v in record.items() if v is not None)
    for fmt in ("preference", "messages", "prompt_completion"):
        if fields.issuperset(_NEEDS[fmt]):
            return fmt
    raise DataError(
        f"{raw.where(0)}: cannot tell the record format from the fields "
        f"({', '.join(sorted(fields)) or 'none'}); records need 'messages', 'prompt' and "
        "'completion', or 'prompt', 'chosen' and 'rejected'"
    )


def read_chat_records(
    source: str,
    fmt: str,
    kind: Literal["sft", "preference"],
    key: str = "data.source",
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> list[Record]:
    """Every record of a user source, checked and normalised for an SFT or preference stage."""
    raw = read_records(source, key, max_record_bytes)
    if not raw.records:
        raise DataError(f"{key} '{source}': it has no records")
    found = detect_format(raw) if fmt == "auto" else fmt
    if kind == "preference":
        if found != "preference":
            raise DataError(
                f"{key} '{source}': preference training needs 'prompt', 'chosen' and 'rejected' "
                f"fields, but the records are {found} records"
            )
        return [preference_record(r, raw.where(i)) for i, r in enumerate(raw.records)]
    return [sft_record(r, found, raw.where(i)) for i, r in enumerate(raw.records)]


def _prompt_key(record: Record) -> str:
    """What decides a record's split: its prompt (an SFT chat up to its last answer)."""
    if "prompt" in record:
        prompt = record["prompt"]
    else:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = messages[:last]
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def split_records(
    records: Sequence[Record], fraction: float, name: str
) -> tuple[list[Record], list[Record]]:
    """(train, held-out) by a hash of each prompt: equal prompts share a split, so none leaks."""
    hashes = np.array([doc_hash(_prompt_key(r)) for r in records], dtype=np.uint64)  # (N,)
    mask = validation_mask(hashes, fraction)  # (N,) bool
    if mask.all():
        raise DataError(
            f"data.source '{name}': all {len(records)} record(s) fell into the held-out split; "
            "add records or lower data.heldout_fraction"
        )
    return [r for r, m in zip(records, mask, strict=True) if not m], [
        r for r, m in zip(records, mask, strict=True) if m
    ]


def chat_records(
    cfg: ChatDataConfig, kind: Literal["sft", "preference"]
) -> tuple[list[Record], list[Record]]:
    """(train, held-out) normalised records of cfg for an SFT or preference stage (GRPO and PPO
    take their prompts and reference answers from the SFT kind)."""
    cfg.validate("data")
    if cfg.sources:
        return _mixture_records(cfg, kind)
    tasks = cfg.tasks or TASKS
    make = task_examples if kind == "sft" else preference_pairs
    builtin = cfg.source.strip() == "builtin"
    if builtin:
        train = make("train", cfg.num_train, cfg.seed, tasks)
        train = train if kind == "preference" else [_as_sft(r) for r in train]
    else:
        train = read_chat_records(cfg.source, cfg.format, kind, "data.source", cfg.max_record_bytes)
    if cfg.heldout_source.strip() == "builtin" or (not cfg.heldout_source.strip() and builtin):
        heldout = make("heldout", cfg.num_heldout, cfg.seed, tasks)
        heldout = heldout if kind == "preference" else [_as_sft(r) for r in heldout]
    elif cfg.heldout_source.strip():
        key = "data.heldout_source"
        heldout = read_chat_records(cfg.heldout_source, cfg.format, kind, key, cfg.max_record_bytes)
    else:
        train, heldout = split_records(train, cfg.heldout_fraction, cfg.source)
    return train, heldout


def _mixture_records(
    cfg: ChatDataConfig, kind: Literal["sft", "preference"]
) -> tuple[list[Record], list[Record]]:
    """(train, held-out) of a mixture. Training records are drawn by weight as pretraining's
    samples are (MixtureSampler with data.seed: each source's records in its own shuffled order,
    starting over reshuffled when used up), as many as all sources hold together; the held-out
    records are every source's own, in source order (a heldout_source shared by several, once)."""
    trains, heldout = [], []
    shared: set[str] = set()  # held-out sources already added (data.heldout_source is shared)
    for i in range(len(cfg.sources)):
        one = cfg.for_source(i)
        try:
            train, held = chat_records(one, kind)
        except DataError as err:
            text = str(err).replace("data.source ", f"data.sources[{i}].source ", 1)
            raise DataError(
                text.replace("data.heldout_source ", f"data.sources[{i}].heldout_source ")
            ) from None
        if not train:
            raise DataError(f"data.sources[{i}].source '{cfg.sources[i].source}': no records")
        trains.append(train)
        if one.heldout_source.strip() not in shared:
            # Each held-out record keeps its source's name ("source": reward functions never
            # see it) so that the stages can log their held-out metrics per source; a
            # heldout_source shared by several sources is named after its own path.
            own = one.heldout_source.strip()
            shared_by = bool(own) and sum(h.strip() == own for h in _heldouts(cfg)) > 1
            name = source_name(one.heldout_source) if shared_by else cfg.sources[i].label()
            heldout += [{**r, SOURCE_KEY: name} for r in held]
        if one.heldout_source.strip():
            shared.add(one.heldout_source.strip())
    sizes = [len(t) for t in trains]
    sampler = MixtureSampler(sizes, [s.weight for s in cfg.sources], cfg.seed)
    flat = [r for t in trains for r in t]
    mixed = [flat[i] for i in sampler.indices(0, sum(sizes))]
    counts = np.bincount(sampler.choices(0, len(mixed)), minlength=len(sizes))
    log.info(
        "mixture: %s",
        ", ".join(
            f"{s.label()} {c} of {n} records"
            for s, c, n in zip(cfg.sources, counts, sizes, strict=True)
        ),
    )
    return mixed, heldout


def _heldouts(cfg: ChatDataConfig) -> list[str]:
    """The held-out source each mixture source reads ('' = its own split or builtin tasks)."""
    return [cfg.for_source(i).heldout_source for i in range(len(cfg.sources))]


def heldout_sources(records: Sequence[Record], record_ids: Sequence[int]) -> list[str] | None:
    """The source name of each row of a held-out dataset (row k is records[record_ids[k]]), or
    None when the records are not a mixture's (one source: no per-source metrics)."""
    if not records or SOURCE_KEY not in records[0]:
        return None
    return [records[i][SOURCE_KEY] for i in record_ids]


def source_rows(names: Sequence[str]) -> dict[str, list[int]]:
    """Row indices of each source name, in the order the names first appear."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    return groups


def _as_sft(example: Record) -> Record:
    return {"messages": example["messages"], "answer": example["answer"], "task": example["task"]}


def chat_tokenizer(
    tokenizer: PreTrainedTokenizerFast, cfg: ChatDataConfig, prefix: str = "data"
) -> PreTrainedTokenizerFast:
    """The tokenizer a chat stage trains with and saves (changed in place): its own chat template,
    or cfg.chat_template when set; a missing template is a ConfigError naming the key, a missing
    pad token becomes an existing token (see `use_chat_template`)."""
    return use_chat_template(tokenizer, cfg.chat_template, f"{prefix}.chat_template")


def load_sft_data(
    cfg: ChatDataConfig, tokenizer: PreTrainedTokenizerFast
) -> tuple[SFTDataset, list[Record]]:
    """The SFT stage's data: the training rows, and the held-out records (for loss and accuracy)."""
    train_records, heldout = chat_records(cfg, "sft")
    train = SFTDataset(train_records, tokenizer, cfg.seq_len, pack=cfg.pack)
    log.info("%s; %d held-out records", train.summary(), len(heldout))
    return train, heldout


def load_preference_data(
    cfg: ChatDataConfig, tokenizer: PreTrainedTokenizerFast
) -> tuple[PreferenceDataset, PreferenceDataset]:
    """The reward / DPO stages' data: training pairs and held-out pairs, as padded rows."""
    train, heldout, _ = preference_data(cfg, tokenizer)
    return train, heldout


def preference_data(
    cfg: ChatDataConfig, tokenizer: PreTrainedTokenizerFast
) -> tuple[PreferenceDataset, PreferenceDataset, list[str] | None]:
    """load_preference_data, and the source name of each held-out pair (None: one source)."""
    train_records, heldout_records = chat_records(cfg, "preference")
    train = PreferenceDataset(train_records, tokenizer, cfg.seq_len)
    heldout = PreferenceDataset(heldout_records, tokenizer, cfg.seq_len)
    log.info("%s; held-out: %s", train.summary(), heldout.summary())
    return train, heldout, heldout_sources(heldout_records, heldout.record_ids)


class SourcePrompts(PromptDataset):
    """Held-out prompts of a mixture: exact match is also scored per source (`by_source`,
    filled by each `exact_match` call), from the same greedy answers."""

    def __init__(self, records: list[dict[str, Any]], tokenizer: Any, seq_len: int) -> None:
        super().__init__(records, tokenizer, seq_len)
        self.sources = heldout_sources(records, self.record_ids) or []
        self.by_source: dict[str, float] = {}

    def exact_match(self, completions: Any) -> dict[str, float]:
        """Overall and per-task scores; per-source scores go to `by_source`."""
        hits = self.hits(completions)  # each answer checked once for both
        self.by_source = {
            name: sum(hits[r] for r in rows) / len(rows)
            for name, rows in source_rows(self.sources).items()
        }
        return self.scores(hits)


def heldout_prompts(records: list[Record], tokenizer: Any, seq_len: int) -> PromptDataset:
    """The held-out prompts for exact match: a SourcePrompts for a mixture's records."""
    if records and SOURCE_KEY in records[0]:
        return SourcePrompts(records, tokenizer, seq_len)
    return PromptDataset(records, tokenizer, seq_len)


def accuracy_by_source(prompts: PromptDataset) -> dict[str, float]:
    """eval/<name>/accuracy of the last exact_match of a mixture's prompts ({} for one source)."""
    by_source = getattr(prompts, "by_source", {})
    return {f"eval/{name}/accuracy": value for name, value in by_source.items()}


class SourceSums:
    """Per-source sums of held-out metrics, added batch by batch from the evaluation's own
    passes (`names`: the source of each held-out row, None for one source: then nothing is
    kept), turned into eval/<name>/<key> means over every rank's rows by `means`."""

    def __init__(self, names: Sequence[str] | None) -> None:
        self.names = names
        self.sums: dict[str, dict[str, float]] = {n: {} for n in dict.fromkeys(names or [])}
        self.seen = dict.fromkeys(self.sums, 0)

    def groups(self, rows: Sequence[int]) -> list[tuple[str, list[int]]]:
        """(source name, positions in `rows` of its rows) of a batch of held-out rows."""
        if self.names is None:
            return []
        return list(source_rows([self.names[r] for r in rows]).items())

    def add(self, name: str, values: dict[str, float], count: int) -> None:
        """Add `values` (means over `count` rows of source `name`) to its sums."""
        sums = self.sums[name]
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value * count
        self.seen[name] += count

    def means(self, keys: Sequence[str], world: int) -> dict[str, float]:
        """eval/<name>/<key> for every source and key (one all-reduce per source, in the same
        order on every rank: each rank knows every source, even one without rows here)."""
        out: dict[str, float] = {}
        for name, sums in self.sums.items():
            means = global_means({k: sums.get(k, 0.0) for k in keys}, self.seen[name], world)
            out.update({f"eval/{name}/{k}": v for k, v in means.items()})
        return out
