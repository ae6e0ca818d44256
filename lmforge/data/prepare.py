"""`prepare_data`: corpus -> (trained) tokenizer -> cached token shards, once per inputs.

Cache layout under `data.cache_dir`::

    <key>/                 train.bin, val.bin, meta.json   (key: source, split, tokenizer)
    tokenizers/<key>/      a tokenizer trained on the train split (key: source, split, config)
    builtin/<key>.json     the builtin corpus text (key: Python version, stdlib file stats)
    .tmp/build-*/          workspaces of builds in progress (renamed away when complete)

Only the main process (rank 0) builds; the others wait for the renamed directory to appear,
which is the signal that it is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerFast

from lmforge.data.atomic import new_workspace, publish, wait_for
from lmforge.data.builtin import builtin_documents, text_fingerprint
from lmforge.data.config import DataConfig
from lmforge.data.corpus import iter_texts, load_corpus, split_corpus
from lmforge.data.shards import SHARD_FORMAT, TokenShard, tokenizer_sha256, write_shards
from lmforge.data.sources import Source, resolve_source
from lmforge.tokenizer import TokenizerConfig, build_tokenizer, load_tokenizer, save_tokenizer

log = logging.getLogger(__name__)


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
        self._splits: dict[str, datasets.Dataset] | None = None

    @property
    def work(self) -> Path:
        if self._work is None:
            self._work = new_workspace(self.root)
        return self._work

    def splits(self) -> dict[str, datasets.Dataset]:
        if self._splits is None:
            log.info("reading corpus %s", self.source.describe())
            ds = load_corpus(self.source, self.cfg, self.work / "hf", self.builtin)
            train, val = split_corpus(ds, self.cfg, self.source.name)
            self._splits = {"train": train, "val": val}
        return self._splits

    def close(self) -> None:
        self._splits = None  # drop datasets' open arrow files before deleting them
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)


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
    if not (final / "tokenizer.json").is_file():
        if is_main:
            log.info("training a %d-token tokenizer on the train split", tok_cfg.vocab_size)
            train = build.splits()["train"]
            tokenizer = build_tokenizer(tok_cfg, lambda: iter_texts(train))
            out = build.work / "tokenizer"
            save_tokenizer(tokenizer, out)
            final.parent.mkdir(parents=True, exist_ok=True)
            publish(out, final)
        else:
            wait_for(final / "tokenizer.json", deadline, "the tokenizer")
    return load_tokenizer(final)


def prepare_data(
    cfg: DataConfig, tok_cfg: TokenizerConfig, *, is_main: bool = True, timeout_s: float = 3600
) -> PreparedData:
    """Token shards of cfg's corpus (built once and cached), and the tokenizer that made them.

    Without tok_cfg.path a tokenizer is trained on the train split and cached too. Only the
    main process builds; others (is_main=False) wait up to timeout_s for its result (on nodes
    that do not share cache_dir, pass is_main=(local_rank == 0)).
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
        if not (final / "meta.json").is_file():
            if is_main:
                log.info("tokenising into %s", final)
                meta = {
                    "source": source.describe(),
                    "text_field": cfg.text_field,
                    "validation_fraction": cfg.validation_fraction,
                    "max_documents": cfg.max_documents,
                }
                out = build.work / "shards"
                write_shards(
                    build.splits(),
                    tokenizer,
                    out,
                    num_proc=cfg.num_proc,
                    key=final.name,
                    meta=meta,
                )
                publish(out, final)
            else:
                wait_for(final / "meta.json", deadline, "the token shards")
    finally:
        build.close()
    return PreparedData(TokenShard(final, "train"), TokenShard(final, "val"), tokenizer, final)
