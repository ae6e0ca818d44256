"""`DataConfig`: where the pretraining corpus comes from and how it becomes training samples."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from lmforge.config import option
from lmforge.errors import ConfigError

MAX_RECORD_BYTES = 16 * 2**20  # no single record of a corpus or chat file is this long
# A mixture's sampler allots each block of this many sample positions to the sources in exact
# proportion to their weights, so a source needs at least one position per block.
MIX_BLOCK = 4096
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def source_name(source: str) -> str:
    """The default name of a mixture source (its metric key): the file or folder name without
    the extension, the hub dataset's name, or "builtin"; characters outside [A-Za-z0-9_.-]
    become "_"."""
    text = source.strip().rstrip("/").split(":")[0]
    base = Path(text.split("*")[0].rstrip("/") or text).name if "/" in text else text
    stem = Path(base).stem if Path(base).suffix else base
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_.-")
    return name or "source"


def check_mixture_names(names: list[str], key: str) -> None:
    """Raise ConfigError when two sources of a mixture share a name (their metrics would)."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(
                f"{key}[{i}].name: '{name}' is also the name of {key}[{seen[name]}]; give each "
                "source its own `name`"
            )
        seen[name] = i


def check_weights(weights: list[float], key: str) -> None:
    """Raise ConfigError for a weight whose share of the total is too small to be sampled."""
    total = sum(weights)
    for i, weight in enumerate(weights):
        if weight / total * MIX_BLOCK < 1:
            raise ConfigError(
                f"{key}[{i}].weight: {weight} is under 1/{MIX_BLOCK} of the total weight "
                f"{total:g}; raise it or leave the source out"
            )


def validate_mixture(source: str, sources: list[Any], p: str) -> None:
    """A data section's mixture: no `source` beside it, every entry valid, distinct names,
    weights that can all be sampled. `p` is the section's key prefix ("data.")."""
    if source.strip() != "builtin":
        raise ConfigError(
            f"{p}source and {p}sources are both set; use one: a single source, or the "
            f"mixture (add '{source}' to {p}sources)"
        )
    for i, src in enumerate(sources):
        src.validate(f"{p}sources[{i}]")
    check_mixture_names([s.label() for s in sources], f"{p}sources")
    check_weights([s.weight for s in sources], f"{p}sources")


def check_entry(source: str, weight: float, name: str, prefix: str) -> None:
    """The checks every mixture entry shares: a source, a positive weight, a name that can be a
    metric key. Raises ConfigError naming `prefix.key`."""
    if not source.strip():
        raise ConfigError(f"{prefix}.source: must not be empty")
    if not weight > 0:
        raise ConfigError(f"{prefix}.weight: must be positive, got {weight}")
    if name and not _NAME.match(name):
        raise ConfigError(
            f"{prefix}.name: '{name}' must be letters, digits, '_', '.' or '-' "
            "(it becomes a metric key)"
        )


@dataclass
class SourceConfig:
    """One source of a pretraining mixture; unset fields take the data section's values."""

    SHORTHAND: ClassVar[str] = "source"  # `sources: [a.jsonl, b.txt]`: equal weights

    source: str = option(doc="a local file, directory or glob, a hub dataset name, or 'builtin'")
    weight: float = option(1.0, "share of training samples drawn from it (relative to the others)")
    name: str = option("", "name in metrics (val/<name>/loss); empty = from the path")
    text_field: str | None = option(None, "field holding the text; null = data.text_field")
    hub_config: str | None = option(None, "hub dataset configuration; null = data.hub_config")
    hub_split: str | None = option(None, "hub dataset split; null = data.hub_split")
    validation_fraction: float | None = option(
        None, "share held out for validation; null = data.validation_fraction"
    )
    max_documents: int | None = option(None, "use at most this many documents; null = data's")

    def label(self) -> str:
        """The source's name in metrics."""
        return self.name or source_name(self.source)

    def validate(self, prefix: str = "data.sources[0]") -> None:
        """Raise ConfigError naming `prefix.key` for a value that cannot work."""
        check_entry(self.source, self.weight, self.name, prefix)
        for key in ("text_field", "hub_split"):
            if getattr(self, key) is not None and not getattr(self, key).strip():
                raise ConfigError(f"{prefix}.{key}: must not be empty (null = the data section's)")
        fraction = self.validation_fraction
        if fraction is not None and not 0.0 <= fraction < 1.0:
            raise ConfigError(f"{prefix}.validation_fraction: must be in [0, 1), got {fraction}")
        if self.max_documents is not None and self.max_documents < 0:
            raise ConfigError(f"{prefix}.max_documents: must be >= 0 (0 = all)")


@dataclass
class DataConfig:
    """The pretraining corpus, its token shards, packing into samples and sample order."""

    source: str = option(
        "builtin",
        "'builtin' (Python's own docs), a local .txt/.jsonl/.json/.parquet file, directory or "
        "glob, or a hub dataset name",
    )
    sources: list[SourceConfig] = option(
        doc="a weighted mixture instead of `source`: a list of {source, weight, name, text_field, "
        "hub_config, hub_split, validation_fraction, max_documents} (unset keys take this "
        "section's values); samples are drawn by weight",
        default_factory=list,
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
    num_proc: int = option(0, "processes that tokenise; 0 = every core of the node")
    streaming: bool = option(
        False, "hub datasets: read as tokenised, not downloaded first (local files always are)"
    )
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
        if self.seq_len < 1:
            raise ConfigError(f"{p}seq_len: must be at least 1, got {self.seq_len}")
        if self.num_proc < 0:
            raise ConfigError(f"{p}num_proc: must be >= 0 (0 = every core), got {self.num_proc}")
        if self.max_record_bytes < 1:
            raise ConfigError(f"{p}max_record_bytes: must be positive, got {self.max_record_bytes}")
        if self.max_documents < 0:
            raise ConfigError(f"{p}max_documents: must be >= 0 (0 = all), got {self.max_documents}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"{p}seed: must be in [0, 2**63), got {self.seed}")
        if self.sources:
            validate_mixture(self.source, self.sources, p)

    def for_source(self, index: int) -> DataConfig:
        """This section as a single-source config of mixture source `index`."""
        src = self.sources[index]
        fraction = src.validation_fraction
        return replace(
            self,
            source=src.source,
            sources=[],
            text_field=self.text_field if src.text_field is None else src.text_field,
            hub_config=self.hub_config if src.hub_config is None else src.hub_config,
            hub_split=self.hub_split if src.hub_split is None else src.hub_split,
            validation_fraction=self.validation_fraction if fraction is None else fraction,
            max_documents=self.max_documents if src.max_documents is None else src.max_documents,
        )
