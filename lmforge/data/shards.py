"""Token shards: each split's documents as one flat memory-mapped array of token ids.

A shard directory holds `train.bin` and `val.bin` (each document as [BOS] + ids + [EOS],
concatenated; uint16 when every id fits, else uint32) and `meta.json`. It is written into a
workspace and renamed into place when complete, so a shard directory that exists is whole.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from lmforge.data.corpus import quiet_datasets
from lmforge.errors import ConfigError, DataError

SHARD_FORMAT = 1  # bump when the layout changes: it invalidates cached shards
SPLITS = ("train", "val")


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's tokenizer.json serialisation (what decides the ids)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("tokenizer has no fast (tokenizer.json) version; lmforge needs one")
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def vocab_size_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """One more than the largest id the tokenizer can produce."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int]:
    """(bos_id or None, eos_id) of the tokenizer; every document ends with EOS."""
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path!r} has no eos token; pretraining marks document "
            "ends with it: use a tokenizer that has one (or leave tokenizer.path empty)"
        )
    return tokenizer.bos_token_id, int(tokenizer.eos_token_id)


class _Encoder:
    """The batched datasets.map function: texts -> [BOS] + ids + [EOS] (picklable for num_proc).

    It carries the tokenizer as its JSON, which pickles faster and safer than the Python object.
    """

    def __init__(self, tokenizer_json: str, bos_id: int | None, eos_id: int) -> None:
        self.tokenizer_json = tokenizer_json
        self.head = [] if bos_id is None else [bos_id]
        self.tail = [eos_id]
        self._tok: Tokenizer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None}

    def __call__(self, texts: list[str]) -> dict[str, list[list[int]]]:
        if self._tok is None:
            self._tok = Tokenizer.from_str(self.tokenizer_json)
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return {"ids": [self.head + e.ids + self.tail for e in encodings]}


def _write_split(
    ds: datasets.Dataset,
    encoder: _Encoder,
    path: Path,
    dtype: np.dtype,
    num_proc: int,
    fingerprint: str,
) -> tuple[int, int]:
    """Tokenise ds["text"] with datasets.map and append every id to path; (tokens, documents)."""
    procs = num_proc if num_proc > 1 and len(ds) >= 2 * num_proc else None
    encoded = ds.map(
        encoder,
        batched=True,
        input_columns="text",
        remove_columns=ds.column_names,
        num_proc=procs,
        features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),
        new_fingerprint=fingerprint,  # hashing the tokenizer would be slow; this is exact
        desc=f"tokenising {path.stem}",
    )
    total = 0
    with open(path, "wb") as fh:
        for batch in encoded.with_format("arrow").iter(batch_size=4096):
            flat = pc.list_flatten(batch["ids"]).to_numpy(zero_copy_only=False)  # (n,) int32
            fh.write(flat.astype(dtype).tobytes())
            total += len(flat)
    return total, len(encoded)


def write_shards(
    splits: dict[str, datasets.Dataset],
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    *,
    num_proc: int,
    key: str,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Tokenise each split into out_dir/<split>.bin and write out_dir/meta.json last."""
    vocab = vocab_size_of(tokenizer)
    dtype = dtype_for(vocab)
    bos, eos = special_ids(tokenizer)
    encoder = _Encoder(tokenizer.backend_tokenizer.to_str(), bos, eos)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens: dict[str, int] = {}
    docs: dict[str, int] = {}
    with quiet_datasets():
        for name in SPLITS:
            fp = f"encode-{key}-{name}"
            tokens[name], docs[name] = _write_split(
                splits[name], encoder, out_dir / f"{name}.bin", dtype, num_proc, fp
            )
    info = {
        "format": SHARD_FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "bos_id": bos,
        "eos_id": eos,
        "num_tokens": tokens,
        "num_documents": docs,
        **meta,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / "meta.json").write_text(json.dumps(info, indent=2) + "\n", "utf-8")
    return info


class TokenShard:
    """One split of a shard directory, memory-mapped read-only.

    `tokens` is a (num_tokens,) uint16/uint32 array view of `<split>.bin`: no copy, pages load
    on first touch, so every process and DataLoader worker shares the OS page cache.
    """

    def __init__(self, directory: str | Path, split: str) -> None:
        self.directory = Path(directory)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        try:
            self.meta: dict[str, Any] = json.loads((self.directory / "meta.json").read_text())
            n = int(self.meta["num_tokens"][split])
            self.dtype = np.dtype(self.meta["dtype"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"{self.directory}: not a complete token shard ({type(err).__name__}: {err}); "
                "delete it to rebuild"
            ) from None
        self.split = split
        self.path = self.directory / f"{split}.bin"
        size = self.path.stat().st_size if self.path.is_file() else -1
        if size != n * self.dtype.itemsize:
            raise DataError(
                f"{self.path}: {size} bytes, meta.json says {n} {self.dtype.name} tokens; the "
                f"shard is damaged: delete {self.directory} to rebuild it"
            )
        # np.memmap cannot map an empty file; an empty split is a plain empty array.
        self.tokens: np.ndarray = (
            np.memmap(self.path, dtype=self.dtype, mode="r", shape=(n,))
            if n
            else np.zeros(0, dtype=self.dtype)
        )

    @property
    def num_tokens(self) -> int:
        """Tokens in this split, BOS and EOS included."""
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        """Documents in this split."""
        return int(self.meta["num_documents"][self.split])

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id the tokenizer can produce."""
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        """The id that ends every document."""
        return int(self.meta["eos_id"])

    @property
    def bos_id(self) -> int | None:
        """The id that starts every document (None if the tokenizer has no BOS)."""
        bos = self.meta["bos_id"]
        return None if bos is None else int(bos)

    def __reduce__(self) -> tuple[type[TokenShard], tuple[Path, str]]:
        # Pickled (e.g. into a spawned DataLoader worker) as its path, not a copy of the tokens.
        return (TokenShard, (self.directory, self.split))

    def __repr__(self) -> str:
        return f"TokenShard({self.path}, {self.num_tokens} tokens, {self.num_documents} docs)"
