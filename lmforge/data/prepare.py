"""`prepare_data`: corpus -> (trained) tokenizer -> cached token shards, once per inputs.

Cache layout under `data.cache_dir`::

    <key>/                 train.bin, val.bin, meta.json   (key: source, split, tokenizer)
    tokenizers/<key>/      a tokenizer trained on the train split (key: source, split, config)
    builtin/<key>.json     the builtin corpus text (key: Python version, stdlib file stats)
    .tmp/build-*/          workspaces of builds in progress (renamed away when complete)

Only the main process (rank 0) builds, with data.num_proc worker processes (0 = every core of
the node); the others wait for the renamed directory to appear, which is the signal that it is
complete. Documents stream through in batches, are split by hash and tokenised as they come,
and their tokens are appended to the shard files job by job: memory stays bounded whatever the
corpus size. With data.streaming the corpus itself is read as it is tokenised (datasets'
streaming mode), and gives the same shards (the same cache entry) as without.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from lmforge.data.atomic import new_workspace, publish, wait_for
from lmforge.data.builtin import builtin_documents, text_fingerprint
from lmforge.data.config import DataConfig
from lmforge.data.corpus import DocumentStream, hashes_of, held_out, open_corpus
from lmforge.data.shards import (
    SHARD_FORMAT,
    StreamStats,
    TokenShard,
    resolve_workers,
    tokenizer_sha256,
    write_shards,
)
from lmforge.data.sources import Source, resolve_source
from lmforge.errors import DataError
from lmforge.tokenizer import TokenizerConfig, build_tokenizer, load_tokenizer, save_tokenizer

PROGRESS_EVERY_S = 5.0  # at most one progress line per this many seconds


def say(line: str) -> None:
    """One console line of the data stage (stdout, like the training console)."""
    print(f"data: {line}", file=sys.stdout, flush=True)


def _count(n: float) -> str:
    """12345 -> '12.3k', 3.4e6 -> '3.40M': short counts for console lines."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class PreparedData:
    """What pretraining needs from the data stage: both splits, the tokenizer, where they live."""

    train: TokenShard
    val: TokenShard
    tokenizer: PreTrainedTokenizerFast
    cache_dir: Path  # the shard directory (meta.json, train.bin, val.bin)


def _key(**parts: Any) -> str:
    """A short stable hash of the inputs that decide an output."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


class _Build:
    """The main process's build state: a workspace and the corpus, each made once on demand."""

    def __init__(self, root: Path, source: Source, cfg: DataConfig, builtin: tuple[str, ...]):
        self.root, self.source, self.cfg, self.builtin = root, source, cfg, builtin
        self._work: Path | None = None
        self._stream: DocumentStream | None = None
        self.notes: list[str] = []  # what was reused, for the closing line

    @property
    def work(self) -> Path:
        if self._work is None:
            self._work = new_workspace(self.root)
        return self._work

    def stream(self) -> DocumentStream:
        """The corpus's documents (read into the workspace once, unless streaming)."""
        if self._stream is None:
            how = "streaming" if self.cfg.streaming else "reading"
            say(f"{how} corpus {self.source.describe()}")
            self._stream = open_corpus(self.source, self.cfg, self.work / "hf", self.builtin)
        return self._stream

    def close(self) -> None:
        self._stream = None  # drop datasets' open arrow files before deleting them
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)


class _TrainTexts:
    """The train split's texts for tokenizer training, counted, with a progress line now and
    then. Held-out documents are left out by the same hash rule as the shards."""

    def __init__(self, stream: DocumentStream, fraction: float) -> None:
        self.stream, self.fraction = stream, fraction
        self.documents = self.train = self.chars = 0
        self.start = self.last = time.monotonic()

    def __iter__(self) -> Iterator[str]:
        for batch in self.stream:
            self.documents += len(batch)
            held = held_out(hashes_of(batch), self.fraction)  # (D,) bool
            for text, out in zip(batch, held, strict=True):
                if not out:
                    self.train += 1
                    self.chars += len(text)
                    yield text
            now = time.monotonic()
            if now - self.last >= PROGRESS_EVERY_S:
                self.last = now
                rate = self.chars / max(now - self.start, 1e-9)
                say(
                    f"tokenizer training: read {self.train:,} documents, "
                    f"{_count(self.chars)} characters ({_count(rate)} characters/s)"
                )


def _tokenizer(
    build: _Build,
    tok_cfg: TokenizerConfig,
    corpus_key: dict[str, Any],
    is_main: bool,
    deadline: float,
) -> PreTrainedTokenizerFast:
    """tok_cfg.path's tokenizer, or the one trained on this corpus's train split (cached)."""
    if tok_cfg.path:
        return build_tokenizer(tok_cfg, None)
    key = _key(
        **corpus_key,
        vocab_size=tok_cfg.vocab_size,
        min_frequency=tok_cfg.min_frequency,
        train_max_chars=tok_cfg.train_max_chars,
    )
    final = build.root / "tokenizers" / key
    if (final / "tokenizer.json").is_file():
        build.notes.append("cached tokenizer reused")
    elif is_main:
        stream = build.stream()
        say(
            f"training a {tok_cfg.vocab_size}-token tokenizer on the train split "
            f"(at most {_count(tok_cfg.train_max_chars)} characters)"
        )
        texts = _TrainTexts(stream, build.cfg.validation_fraction)
        try:
            tokenizer = build_tokenizer(tok_cfg, lambda: iter(texts))
        except DataError:
            if texts.documents and not texts.train:
                raise _all_held_out(build.source.name, texts.documents) from None
            raise
        say(
            f"trained the tokenizer on {texts.train:,} documents ({_count(texts.chars)} "
            f"characters) in {time.monotonic() - texts.start:.1f} s"
        )
        out = build.work / "tokenizer"
        save_tokenizer(tokenizer, out)
        final.parent.mkdir(parents=True, exist_ok=True)
        publish(out, final)
    else:
        wait_for(final / "tokenizer.json", deadline, "the tokenizer")
    return load_tokenizer(final)


def _all_held_out(name: str, documents: int) -> DataError:
    return DataError(
        f"data.source '{name}': all {documents} document(s) fell into validation; add "
        "documents or lower data.validation_fraction"
    )


class _Progress:
    """Progress lines while tokenising: documents/s, tokens/s and (when the size is known) ETA."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.start = self.last = time.monotonic()

    def __call__(self, stats: StreamStats) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        docs, tokens = sum(stats.documents.values()), sum(stats.tokens.values())
        line = (
            f"tokenising: {docs:,} documents, {_count(tokens)} tokens "
            f"({_count(docs / elapsed)} documents/s, {_count(tokens / elapsed)} tokens/s)"
        )
        if self.total:
            done = min(docs / self.total, 1.0)
            eta = elapsed * (1 - done) / max(done, 1e-9)
            line += f", {done:.0%}, ETA {_duration(eta)}"
        say(line)


def _summary(meta: dict[str, Any], seq_len: int) -> str:
    """documents, tokens and windows of seq_len of a shard directory's meta.json."""
    docs, tokens = meta["num_documents"], meta["num_tokens"]
    windows = {split: tokens[split] // (seq_len + 1) for split in tokens}
    return (
        f"{docs['train'] + docs['val']:,} documents ({docs['train']:,} train, {docs['val']:,} "
        f"validation), {_count(tokens['train'] + tokens['val'])} tokens, "
        f"{windows['train']:,} train and {windows['val']:,} validation windows of "
        f"{seq_len} tokens"
    )


def _build_shards(
    build: _Build,
    tokenizer: PreTrainedTokenizerFast,
    final: Path,
    meta: dict[str, Any],
) -> None:
    """Tokenise the corpus into the workspace and publish it as `final`."""
    cfg = build.cfg
    stream = build.stream()
    workers = resolve_workers(cfg.num_proc)
    note = "".join(f" ({n})" for n in build.notes)
    say(f"tokenising with {workers} process(es)")
    total = stream.total
    if total is not None and cfg.max_documents:
        total = min(total, cfg.max_documents)
    start = time.monotonic()
    out = build.work / "shards"
    write_shards(
        stream,
        tokenizer,
        out,
        fraction=cfg.validation_fraction,
        num_proc=cfg.num_proc,
        meta=meta,
        progress=_Progress(total),
        name=build.source.name,
    )
    built = json.loads((out / "meta.json").read_text("utf-8"))
    publish(out, final)
    say(
        f"built token shards in {time.monotonic() - start:.1f} s with {workers} process(es)"
        f"{note}: "
        f"{_summary(built, cfg.seq_len)} -> {final}"
    )


def prepare_data(
    cfg: DataConfig, tok_cfg: TokenizerConfig, *, is_main: bool = True, timeout_s: float = 3600
) -> PreparedData:
    """Token shards of cfg's corpus (built once and cached), and the tokenizer that made them.

    Without tok_cfg.path a tokenizer is trained on the train split and cached too. Only the
    main process builds (with data.num_proc processes); others (is_main=False) wait up to
    timeout_s for its result (on nodes that do not share cache_dir, pass
    is_main=(local_rank == 0)). The main process prints progress and a closing line.
    Raises DataError (one line, naming the file) for any problem with the corpus.
    """
    cfg.validate("data")
    tok_cfg.validate("tokenizer")
    deadline = time.monotonic() + timeout_s
    root = Path(cfg.cache_dir).expanduser().resolve()
    builtin = builtin_documents(root) if cfg.source.strip() == "builtin" else ()
    source = resolve_source(cfg, text_fingerprint(builtin) if builtin else "")
    corpus_key = {
        "format": SHARD_FORMAT,
        "source": source.fingerprint,
        "text_field": cfg.text_field,
        "validation_fraction": cfg.validation_fraction,
        "max_documents": cfg.max_documents,
    }
    build = _Build(root, source, cfg, builtin)
    try:
        tokenizer = _tokenizer(build, tok_cfg, corpus_key, is_main, deadline)
        tok_sha = tokenizer_sha256(tokenizer)
        final = root / _key(**corpus_key, tokenizer=tok_sha)
        if (final / "meta.json").is_file():
            if is_main:
                meta = json.loads((final / "meta.json").read_text("utf-8"))
                say(f"reusing cached token shards {final}: {_summary(meta, cfg.seq_len)}")
        elif is_main:
            meta = {
                "source": source.describe(),
                "text_field": cfg.text_field,
                "validation_fraction": cfg.validation_fraction,
                "max_documents": cfg.max_documents,
            }
            _build_shards(build, tokenizer, final, meta)
        else:
            wait_for(final / "meta.json", deadline, "the token shards")
    finally:
        build.close()
    return PreparedData(TokenShard(final, "train"), TokenShard(final, "val"), tokenizer, final)
