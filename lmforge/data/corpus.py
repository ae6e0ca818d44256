"""Read a corpus through `datasets` into one "text" column, and split it by document hash.

Every failure a user can cause ends as one DataError line naming the file (and line or field).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq

from lmforge.data.config import DataConfig
from lmforge.data.diagnose import find_problem
from lmforge.data.sources import Source
from lmforge.errors import DataError


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Hide `datasets` progress bars while we build (restored afterwards)."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _first_line(err: BaseException) -> str:
    cause = err.__cause__ or err
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def _load_files(source: Source, field: str, cache_dir: Path) -> datasets.Dataset:
    """load_dataset over local files; a failure becomes DataError naming the bad file and line."""
    files = [str(p) for p in source.files]
    # A fresh private cache (our caller's workspace, deleted after the build): datasets then
    # reads exactly the files our content hash saw, never an older arrow cache of the same paths.
    kwargs: dict[str, Any] = {"split": "train", "cache_dir": str(cache_dir)}
    if source.builder == "text":
        kwargs["sample_by"] = "document"  # one document per file
    elif source.builder == "parquet":
        kwargs["columns"] = [field]
    logger = datasets.utils.logging.get_logger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # it logs each reader error; we report it once, better
    try:
        return datasets.load_dataset(source.builder, data_files=files, **kwargs)
    except Exception as err:  # datasets wraps every reader error in DatasetGenerationError
        problem = find_problem(source.files, source.builder, field)
        if problem is not None:
            raise problem from None
        if source.builder != "json" or len(files) < 2:
            raise DataError(
                f"data.source '{source.name}': datasets cannot read it ({_first_line(err)})"
            ) from err
    finally:
        logger.setLevel(level)
    # Every record is fine, so the files only differ in their other columns (datasets needs the
    # same columns in every JSON file): read them one by one and keep the text field.
    parts = [
        datasets.load_dataset("json", data_files=[f], **kwargs).select_columns([field])
        for f in files
    ]
    return datasets.concatenate_datasets(parts)


def _load_hub(source: Source, cfg: DataConfig) -> datasets.Dataset:
    """load_dataset(name, config, split) from the hub (or the local HF cache when offline)."""
    try:
        ds = datasets.load_dataset(source.name, cfg.hub_config or None, split=cfg.hub_split)
    except Exception as err:  # network, auth, missing config/split: all reported the same way
        raise DataError(
            f"data.source '{source.name}': not a local path, and loading it as a hub dataset "
            f"failed ({_first_line(err)}); check the path or the dataset name"
        ) from err
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"data.source '{source.name}': expected one split, got {type(ds).__name__}")
    return ds


def _check_text_column(
    ds: datasets.Dataset, source: Source, column: str, files: Sequence[Path]
) -> None:
    """Raise DataError unless `column` exists, holds strings and has no nulls."""
    where = f"hub dataset '{source.name}'" if source.kind == "hub" else f"'{source.name}'"
    if column not in ds.column_names:
        problem = find_problem(files, source.builder, column) if files else None
        fields = ", ".join(ds.column_names) or "none"
        raise problem or DataError(
            f"{where}: no text field '{column}' (its fields: {fields}); set data.text_field"
        )
    feature = ds.features[column]
    is_str = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    if not is_str or ds.data.column(column).null_count:
        problem = find_problem(files, source.builder, column) if files else None
        what = "null values" if is_str else f"type {feature}"
        raise problem or DataError(
            f"{where}: text field '{column}' has {what}, not only strings; fix the data"
        )


def _read_corpus(
    source: Source, cfg: DataConfig, cache_dir: Path, builtin: Sequence[str]
) -> datasets.Dataset:
    """Every record of the corpus as a Dataset with one checked string column "text"."""
    with quiet_datasets():
        if source.kind == "builtin":
            ds = datasets.Dataset.from_dict({"text": list(builtin)})
        elif source.kind == "hub":
            ds = _load_hub(source, cfg)
        else:
            ds = _load_files(source, cfg.text_field, cache_dir)
        column = _column(source, cfg)
        _check_text_column(ds, source, column, source.files)
        ds = ds.select_columns([column])
        if column != "text":
            ds = ds.rename_column(column, "text")
    return ds


def _column(source: Source, cfg: DataConfig) -> str:
    """The field holding the text: .txt files have no fields (datasets calls it "text")."""
    return "text" if source.builder == "text" else cfg.text_field


def load_corpus(
    source: Source, cfg: DataConfig, cache_dir: Path, builtin: Sequence[str] = ()
) -> datasets.Dataset:
    """The corpus as a Dataset with one column "text": non-empty documents, in source order.

    At most cfg.max_documents documents (0 = all). cache_dir holds `datasets`' cache files of
    local sources; hub datasets use the Hugging Face cache, so downloads are reused.
    """
    ds = _read_corpus(source, cfg, cache_dir, builtin)
    with quiet_datasets():
        ds = ds.filter(_nonempty, batched=True, input_columns="text", num_proc=_procs(cfg, len(ds)))
    if len(ds) == 0:
        raise DataError(
            f"data.source '{source.name}': the corpus is empty (no document has any text); "
            "check the source and data.text_field"
        )
    if cfg.max_documents:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    return ds


def _procs(cfg: DataConfig, n: int) -> int | None:
    """num_proc for datasets: None (in-process) unless there is enough work to share."""
    return cfg.num_proc if cfg.num_proc > 1 and n >= 2 * cfg.num_proc else None


def _nonempty(texts: list[str]) -> list[bool]:
    return [bool(t.strip()) for t in texts]


def doc_hash(text: str) -> int:
    """A 64-bit hash of a document's text (stable across runs, machines and Python versions)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _hash_batch(texts: list[str]) -> dict[str, np.ndarray]:
    return {"h": np.array([doc_hash(t) for t in texts], dtype=np.uint64)}


def held_out(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """True for documents whose hash puts them in validation: hash / 2**64 < fraction.

    (N,) uint64 -> (N,) bool. Decided per document, so a stream can be split as it comes;
    `validation_mask` adds the rule for a corpus where no hash falls below the fraction.
    """
    # The top 53 bits as a float in [0, 1): exact, and the same on every machine.
    return (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def hashes_of(texts: Sequence[str]) -> np.ndarray:
    """doc_hash of each text. (N,) uint64."""
    return np.fromiter((doc_hash(t) for t in texts), dtype=np.uint64, count=len(texts))


def validation_mask(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """True for documents held out: hash / 2**64 < fraction. (N,) uint64 -> (N,) bool.

    Identical documents share a split, so none leaks from train into validation. When fraction
    is positive but no hash falls below it, the document with the smallest hash is held out, so
    a small corpus still gets a (tiny) validation set.
    """
    mask = held_out(hashes, fraction)
    if fraction > 0 and not mask.any() and len(hashes) >= 2:
        mask[int(np.argmin(hashes))] = True
    return mask


def split_corpus(
    ds: datasets.Dataset, cfg: DataConfig, name: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, validation) by a hash of each document's text, both in corpus order."""
    with quiet_datasets():
        hashed = ds.map(
            _hash_batch,
            batched=True,
            input_columns="text",
            remove_columns=["text"],
            num_proc=_procs(cfg, len(ds)),
            new_fingerprint=f"hash-{ds._fingerprint}",
        )
    hashes = hashed.data.column("h").to_numpy()  # (N,) uint64
    mask = validation_mask(hashes, cfg.validation_fraction)
    if mask.all():
        raise DataError(
            f"data.source '{name}': all {len(ds)} document(s) fell into validation; add "
            "documents or lower data.validation_fraction"
        )
    return ds.select(np.flatnonzero(~mask)), ds.select(np.flatnonzero(mask))


def iter_texts(ds: datasets.Dataset, batch_size: int = 1000) -> Iterator[str]:
    """The "text" column, read in batches."""
    for batch in ds.iter(batch_size=batch_size):
        yield from batch["text"]


# Documents per batch read from a source; also the grain of max_documents and progress.
READ_BATCH = 1000


class DocumentStream:
    """The corpus's non-empty documents in source order, as batches of texts; re-readable.

    `total` is how many records the source holds when known (an upper bound on documents, for
    the ETA), None for a stream. Iterating raises DataError for an empty corpus (once the end
    is reached) and for a bad record (naming the file and line where it can).
    """

    def __init__(
        self, read: Callable[[], Iterator[list[str]]], name: str, total: int | None, limit: int
    ) -> None:
        self._read, self.name, self.total, self.limit = read, name, total, limit

    def __iter__(self) -> Iterator[list[str]]:
        left = self.limit or None
        seen = 0
        for batch in self._read():
            texts = [t for t in batch if t.strip()]
            if left is not None:
                texts = texts[:left]
                left -= len(texts)
            seen += len(texts)
            if texts:
                yield texts
            if left == 0:
                break
        if seen == 0:
            raise DataError(
                f"data.source '{self.name}': the corpus is empty (no document has any text); "
                "check the source and data.text_field"
            )


def open_corpus(
    source: Source, cfg: DataConfig, cache_dir: Path, builtin: Sequence[str] = ()
) -> DocumentStream:
    """The corpus as a DocumentStream. Local files are always read as they are iterated,
    through datasets' streaming mode (an Arrow copy first would only cost time and disk). A hub
    dataset is downloaded into the Hugging Face cache and read from there (reused by later
    runs), or with cfg.streaming read from the hub as it is iterated (nothing stored). Both
    ways give the same documents in the same order.
    """
    if source.kind == "files":
        return DocumentStream(
            lambda: _stream_source(source, cfg),
            source.name,
            _records(source),
            cfg.max_documents,
        )
    if not cfg.streaming:
        ds = _read_corpus(source, cfg, cache_dir, builtin)

        def read() -> Iterator[list[str]]:
            for batch in ds.iter(batch_size=READ_BATCH):
                yield batch["text"]

        return DocumentStream(read, source.name, len(ds), cfg.max_documents)
    if source.kind == "builtin":
        texts = list(builtin)

        def chunks() -> Iterator[list[str]]:
            for i in range(0, len(texts), READ_BATCH):
                yield texts[i : i + READ_BATCH]

        return DocumentStream(chunks, source.name, len(texts), cfg.max_documents)
    return DocumentStream(lambda: _stream_source(source, cfg), source.name, None, cfg.max_documents)


def _records(source: Source) -> int | None:
    """How many records local files hold, when cheap to tell (for the ETA); else None."""
    if source.builder == "text":
        return len(source.files)  # one document per file
    if source.builder == "parquet":
        return sum(pq.ParquetFile(f).metadata.num_rows for f in source.files)
    if any(f.suffix.lower() != ".jsonl" for f in source.files):
        return None  # a .json file is one JSON value
    total = 0
    for path in source.files:  # lines, read in blocks (the page cache has them: just hashed)
        with open(path, "rb") as fh:
            last = b"\n"
            while block := fh.read(1 << 24):
                total += block.count(b"\n")
                last = block[-1:]
            total += last != b"\n"
    return total


def _stream_source(source: Source, cfg: DataConfig) -> Iterator[list[str]]:
    """Batches of a source's text field read through datasets' streaming mode (IterableDataset).

    Local files are streamed one by one, in order, so files whose other columns differ work
    as they do without streaming.
    """
    column = _column(source, cfg)
    if source.kind == "hub":
        where = f"hub dataset '{source.name}'"
        parts: list[tuple[Callable[[], Any], Sequence[Path], str]] = [
            (lambda: _open_hub_stream(source, cfg), (), where)
        ]
    else:
        parts = [
            (lambda f=f: _open_file_stream(source, f, column), (f,), f"'{f}'") for f in source.files
        ]
    logger = datasets.utils.logging.get_logger("datasets")
    for opener, files, where in parts:
        level = logger.level
        logger.setLevel(logging.CRITICAL)  # it logs each reader error; we report it once
        try:
            with quiet_datasets():
                for batch in opener().iter(batch_size=READ_BATCH):
                    yield _checked_batch(batch, column, source, files, where)
        except DataError:
            raise
        except Exception as err:  # datasets wraps every reader error in its own types
            problem = find_problem(files, source.builder, column) if files else None
            raise problem or DataError(
                f"data.source '{source.name}': datasets cannot stream {where} ({_first_line(err)})"
            ) from err
        finally:
            logger.setLevel(level)


def _open_file_stream(source: Source, path: Path, column: str) -> datasets.IterableDataset:
    kwargs: dict[str, Any] = {"split": "train", "streaming": True}
    if source.builder == "text":
        kwargs["sample_by"] = "document"  # one document per file
    elif source.builder == "parquet":
        kwargs["columns"] = [column]
    return datasets.load_dataset(source.builder, data_files=[str(path)], **kwargs)


def _open_hub_stream(source: Source, cfg: DataConfig) -> datasets.IterableDataset:
    try:
        ds = datasets.load_dataset(
            source.name, cfg.hub_config or None, split=cfg.hub_split, streaming=True
        )
    except Exception as err:  # network, auth, missing config/split: all reported the same way
        raise DataError(
            f"data.source '{source.name}': not a local path, and streaming it as a hub dataset "
            f"failed ({_first_line(err)}); check the path or the dataset name"
        ) from err
    if not isinstance(ds, datasets.IterableDataset):
        raise DataError(f"data.source '{source.name}': expected one split, got {type(ds).__name__}")
    return ds


def _checked_batch(
    batch: dict[str, list[Any]], column: str, source: Source, files: Sequence[Path], where: str
) -> list[str]:
    """The text column of a streamed batch; DataError unless every value is a string."""
    if column not in batch:
        problem = find_problem(files, source.builder, column) if files else None
        fields = ", ".join(batch) or "none"
        raise problem or DataError(
            f"{where}: no text field '{column}' (its fields: {fields}); set data.text_field"
        )
    texts = batch[column]
    if not all(isinstance(t, str) for t in texts):
        problem = find_problem(files, source.builder, column) if files else None
        raise problem or DataError(
            f"{where}: text field '{column}' has values that are not strings; fix the data"
        )
    return texts
