"""A weighted mixture of pretraining corpora: `data.sources`.

Each source is prepared on its own by `prepare_data` (its own shard cache, so adding a source
re-tokenises only that one), all with ONE tokenizer: `tokenizer.path` when set, else a tokenizer
trained once over the mixture's train splits (each source giving text in proportion to its
weight) and cached under `<cache_dir>/tokenizers/mix-<key>`. Training draws samples by weight
with `MixtureSampler` over a `MixedDataset` (the sources' packed windows side by side);
evaluation reads each source's validation windows on their own (val/<name>/loss).

    mix = prepare_mixture(cfg.data, cfg.tokenizer, is_main=rank == 0)
    train = MixedDataset([packed(p.data.train) for p in mix.parts])
    sampler = MixtureSampler([len(d) for d in train.parts], mix.weights, cfg.data.seed)
    batch = train.get_batch(sampler.indices(start, count))
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from lmforge.data.atomic import new_workspace, publish, wait_for
from lmforge.data.builtin import builtin_documents, text_fingerprint
from lmforge.data.config import DataConfig
from lmforge.data.corpus import hashes_of, held_out, open_corpus
from lmforge.data.packing import Batch, PackedDataset
from lmforge.data.prepare import PreparedData, prepare_data, say
from lmforge.data.sources import resolve_source
from lmforge.errors import DataError
from lmforge.tokenizer import TokenizerConfig, build_tokenizer, save_tokenizer


@dataclass
class MixturePart:
    """One prepared source of a mixture."""

    name: str  # its metric name (val/<name>/loss)
    weight: float  # share of training samples, normalised over the mixture
    data: PreparedData


@dataclass
class PreparedMixture:
    """Every source's shards, and the one tokenizer that made all of them."""

    parts: list[MixturePart]
    tokenizer: PreTrainedTokenizerFast

    @property
    def weights(self) -> list[float]:
        """Normalised weights, in source order."""
        return [p.weight for p in self.parts]


def _renamed(err: DataError, index: int) -> DataError:
    """A single-source error retold for mixture source `index` (its key named)."""
    return DataError(str(err).replace("data.source ", f"data.sources[{index}].source ", 1))


def _source_texts(cfg: DataConfig, root: Path, budget: int) -> Iterator[str]:
    """Texts of one source's train split (held-out documents left out by the shards' own hash
    rule), at most `budget` characters (the last one whole), read as they come."""
    builtin = builtin_documents(root) if cfg.source.strip() == "builtin" else ()
    source = resolve_source(cfg, text_fingerprint(builtin) if builtin else "")
    work = new_workspace(root)
    try:
        used = 0
        for batch in open_corpus(source, cfg, work / "hf", builtin):
            held = held_out(hashes_of(batch), cfg.validation_fraction)  # (D,) bool
            for text in (t for t, out in zip(batch, held, strict=True) if not out):
                if used >= budget:
                    return
                used += len(text)
                yield text
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mixture_key(cfg: DataConfig, tok_cfg: TokenizerConfig, root: Path) -> str:
    """The cache key of a mixture's tokenizer: what each source reads, its share, the vocabulary."""
    parts = []
    for i in range(len(cfg.sources)):
        scfg = cfg.for_source(i)
        builtin = builtin_documents(root) if scfg.source.strip() == "builtin" else ()
        try:
            fingerprint = resolve_source(scfg, text_fingerprint(builtin) if builtin else "")
        except DataError as err:
            raise _renamed(err, i) from None
        parts.append(
            [
                fingerprint.fingerprint,
                scfg.text_field,
                scfg.validation_fraction,
                scfg.max_documents,
                cfg.sources[i].weight,
            ]
        )
    vocab = [tok_cfg.vocab_size, tok_cfg.min_frequency, tok_cfg.train_max_chars]
    text = json.dumps({"sources": parts, "vocab": vocab}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def mixture_tokenizer(
    cfg: DataConfig, tok_cfg: TokenizerConfig, *, is_main: bool, deadline: float
) -> Path:
    """The directory of the tokenizer trained over the mixture (built once, then cached): each
    source gives its train split's text up to its weight's share of tokenizer.train_max_chars."""
    root = Path(cfg.cache_dir).expanduser().resolve()
    final = root / "tokenizers" / f"mix-{_mixture_key(cfg, tok_cfg, root)}"
    if (final / "tokenizer.json").is_file():
        if is_main:
            say(f"reusing the mixture's cached tokenizer {final}")
        return final
    if not is_main:
        wait_for(final / "tokenizer.json", deadline, "the mixture's tokenizer")
        return final
    total = sum(s.weight for s in cfg.sources)

    def texts() -> Iterator[str]:
        for i, src in enumerate(cfg.sources):
            budget = int(tok_cfg.train_max_chars * src.weight / total) + 1
            try:
                yield from _source_texts(cfg.for_source(i), root, budget)
            except DataError as err:
                raise _renamed(err, i) from None

    say(
        f"training a {tok_cfg.vocab_size}-token tokenizer over the mixture of "
        f"{len(cfg.sources)} sources, each giving text in proportion to its weight"
    )
    tokenizer = build_tokenizer(tok_cfg, texts)
    work = new_workspace(root)
    try:
        save_tokenizer(tokenizer, work / "tokenizer")
        final.parent.mkdir(parents=True, exist_ok=True)
        publish(work / "tokenizer", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def prepare_mixture(
    cfg: DataConfig, tok_cfg: TokenizerConfig, *, is_main: bool = True, timeout_s: float = 3600
) -> PreparedMixture:
    """Token shards of every source of cfg.sources (each built once and cached) with one
    tokenizer. Raises DataError naming `data.sources[i]` for a problem with source i."""
    cfg.validate("data")
    tok_cfg.validate("tokenizer")
    deadline = time.monotonic() + timeout_s
    if not tok_cfg.path:
        path = mixture_tokenizer(cfg, tok_cfg, is_main=is_main, deadline=deadline)
        tok_cfg = replace(tok_cfg, path=str(path))
    total = sum(s.weight for s in cfg.sources)
    parts: list[MixturePart] = []
    for i, src in enumerate(cfg.sources):
        left = max(deadline - time.monotonic(), 1.0)
        try:
            data = prepare_data(cfg.for_source(i), tok_cfg, is_main=is_main, timeout_s=left)
        except DataError as err:
            raise _renamed(err, i) from None
        parts.append(MixturePart(src.label(), src.weight / total, data))
    return PreparedMixture(parts, parts[0].data.tokenizer)


class MixedDataset(torch.utils.data.Dataset):
    """Several PackedDatasets (the same seq_len) side by side: index offsets[k] + j is sample j
    of part k. MixtureSampler draws such indices by weight."""

    collate = staticmethod(PackedDataset.collate)

    def __init__(self, parts: Sequence[PackedDataset]) -> None:
        if not parts:
            raise ValueError("a mixture needs at least one part")
        self.parts = list(parts)
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part, index inside the part) of global indices: two (N,) int64."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample out of range for {len(self)} samples")
        part = np.searchsorted(self.offsets, idx, side="right") - 1  # (N,)
        return part, idx - self.offsets[part]

    def __getitem__(self, i: int) -> Batch:
        """One sample as (T,) int64 tensors."""
        part, local = self.locate([i])
        return self.parts[int(part[0])][int(local[0])]

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Samples `indices` as (B, T) int64 tensors, in the order given."""
        part, local = self.locate(indices)
        out: Batch = {}
        for k in np.unique(part):
            at = np.flatnonzero(part == k)
            batch = self.parts[int(k)].get_batch(local[at])  # each (b_k, T)
            for key, value in batch.items():
                if key not in out:
                    out[key] = torch.empty((len(part), *value.shape[1:]), dtype=value.dtype)
                out[key][torch.from_numpy(at)] = value
        return out
