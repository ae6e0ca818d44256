"""`DataConfig`: where the pretraining corpus comes from and how it becomes training samples."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import option
from lmforge.errors import ConfigError

MAX_RECORD_BYTES = 16 * 2**20  # no single record of a corpus or chat file is this long


@dataclass
class DataConfig:
    """The pretraining corpus, its token shards, packing into samples and sample order."""

    source: str = option(
        "builtin",
        "'builtin' (Python's own docs), a local .txt/.jsonl/.json/.parquet file, directory or "
        "glob, or a hub dataset name",
    )
    text_field: str = option("text", "field holding the document text in .jsonl/.json/.parquet")
    hub_config: str = option("", "configuration (subset) name of a hub dataset; empty = default")
    hub_split: str = option("train", "split of a hub dataset to read")
    validation_fraction: float = option(
        0.02, "share of documents held out for validation (by a hash of their text)"
    )
    seq_len: int = option(256, "tokens per training sample")
    document_mask: bool = option(
        True, "emit per-token document ids so attention is blocked across packed documents"
    )
    reset_positions: bool = option(
        True, "position ids restart at each document (only with document_mask)"
    )
    cache_dir: str = option(".cache/lmforge", "directory of token shards and trained tokenizers")
    num_proc: int = option(1, "processes that tokenise (datasets.map num_proc)")
    max_documents: int = option(0, "use at most this many documents; 0 = all (for quick runs)")
    max_record_bytes: int = option(
        MAX_RECORD_BYTES, "longest line (a record, or a line of a .txt document) a file may have"
    )
    seed: int = option(1234, "seed of the sample order")

    def validate(self, prefix: str = "data") -> None:
        """Raise ConfigError naming `prefix.key` for a value that cannot work."""
        p = f"{prefix}." if prefix else ""
        for key in ("source", "text_field", "hub_split", "cache_dir"):
            if not getattr(self, key).strip():
                raise ConfigError(f"{p}{key}: must not be empty")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(
                f"{p}validation_fraction: must be in [0, 1), got {self.validation_fraction}"
            )
        for key in ("seq_len", "num_proc"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{p}{key}: must be at least 1, got {getattr(self, key)}")
        if self.max_record_bytes < 1:
            raise ConfigError(f"{p}max_record_bytes: must be positive, got {self.max_record_bytes}")
        if self.max_documents < 0:
            raise ConfigError(f"{p}max_documents: must be >= 0 (0 = all), got {self.max_documents}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"{p}seed: must be in [0, 2**63), got {self.seed}")
