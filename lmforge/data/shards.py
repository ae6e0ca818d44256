"""Token shards: each split's documents as one flat memory-mapped array of token ids.

A shard directory holds `train.bin` and `val.bin` (each document as [BOS] + ids + [EOS],
concatenated; uint16 when every id fits, else uint32) and `meta.json`. It is written into a
workspace and renamed into place when complete, so a shard directory that exists is whole.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import contextlib
import ctypes
import datetime
import hashlib
import itertools
import json
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from lmforge.data.corpus import hashes_of, held_out
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


# Text per tokenisation job: large enough that handing it to a worker costs little next to
# encoding it (~0.2 s of one core), small enough that the workers get their first job soon and
# finish together at the end (a 4 M job left a core idle for up to a second), and that the jobs
# in flight (at most 2 per worker) bound the memory.
JOB_CHARS = 1 << 20
JOB_DOCS = 8192


def resolve_workers(num_proc: int) -> int:
    """data.num_proc as a process count: 0 = every core this process may run on."""
    if num_proc > 0:
        return num_proc
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class _FlatEncoder:
    """texts -> their [BOS] + ids + [EOS] concatenated, and each document's token count."""

    def __init__(self, tokenizer_json: str, bos_id: int | None, eos_id: int, dtype: str) -> None:
        self.tok = Tokenizer.from_str(tokenizer_json)
        self.head = () if bos_id is None else (bos_id,)
        self.tail = (eos_id,)
        self.dtype = np.dtype(dtype)
        # encode_batch_fast skips character offsets, which we never use (tokenizers >= 0.21).
        self.encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.zeros(0, self.dtype), np.zeros(0, np.int64)
        ids = [e.ids for e in self.encode(texts, add_special_tokens=False)]
        extra = len(self.head) + 1
        lengths = np.fromiter((len(i) + extra for i in ids), np.int64, len(ids))  # (D,)
        flat = np.fromiter(  # (sum(lengths),)
            itertools.chain.from_iterable(itertools.chain(self.head, i, self.tail) for i in ids),
            self.dtype,
            int(lengths.sum()),
        )
        return flat, lengths


_WORKER: dict[str, _FlatEncoder] = {}


def _init_worker(
    parent: int, tokenizer_json: str, bos_id: int | None, eos_id: int, dtype: str
) -> None:
    """A worker's start: it dies with its parent, and leaves signals to it."""
    # The parent's handlers (e.g. a stage's graceful SIGTERM) are inherited by fork; a worker
    # has nothing to save: default SIGTERM, and Ctrl-C is the parent's to handle (it stops us).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # Linux only: killed if the parent is
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)
    _WORKER["encoder"] = _FlatEncoder(tokenizer_json, bos_id, eos_id, dtype)


def _encode_job(job: tuple[list[str], list[str]]) -> tuple[np.ndarray, ...]:
    """One job in a worker: (train texts, val texts) -> (train ids, lengths, val ids, lengths)."""
    encoder = _WORKER["encoder"]
    return (*encoder(job[0]), *encoder(job[1]))


class _Held:
    """The first job, held until a second shows that workers are worth forking: it then goes to
    them like every other job; if the stream ends first, it is encoded here, without a pool."""

    def __init__(self, job: tuple[list[str], list[str]], encoders: _Encoders) -> None:
        self.job: tuple[list[str], list[str]] | None = job
        self.encoders = encoders
        self.future: concurrent.futures.Future[tuple[np.ndarray, ...]] | None = None

    def result(self) -> tuple[np.ndarray, ...]:
        if self.future is not None:
            return self.future.result()
        assert self.job is not None
        return self.encoders.encode_here(self.job)


class _Encoders:
    """Runs jobs in `workers` processes, forked once a second job exists (the first waits for
    them, so they share the work from its start); with one worker, or a corpus of one job, in
    this process.

    A process pool executor, not multiprocessing.Pool: a worker that dies (killed, out of
    memory) fails its job (BrokenProcessPool) instead of leaving us waiting for it forever.
    """

    def __init__(self, workers: int, init_args: tuple[Any, ...]) -> None:
        self.workers, self.init_args = workers, init_args
        self.local: _FlatEncoder | None = None
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.first: _Held | None = None

    def encode_here(self, job: tuple[list[str], list[str]]) -> tuple[np.ndarray, ...]:
        """(train ids, lengths, val ids, lengths) of a job, encoded in this process."""
        if self.local is None:
            self.local = _FlatEncoder(*self.init_args)
        return (*self.local(job[0]), *self.local(job[1]))

    def submit(self, job: tuple[list[str], list[str]]) -> Any:
        """The job's result, as something with a Future's result()."""
        if self.workers < 2:
            done: concurrent.futures.Future[tuple[np.ndarray, ...]] = concurrent.futures.Future()
            done.set_result(self.encode_here(job))
            return done
        if self.first is None:
            self.first = _Held(job, self)
            return self.first
        if self.pool is None:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                self.workers,
                # Forked workers inherit the loaded modules (no import cost).
                mp_context=multiprocessing.get_context("fork"),
                initializer=_init_worker,
                initargs=(os.getpid(), *self.init_args),
            )
            self.first.future = self.pool.submit(_encode_job, self.first.job)
            self.first.job = None
        return self.pool.submit(_encode_job, job)

    def close(self) -> None:
        if self.pool is not None:
            # All results are in, or we are failing: drop queued jobs, let running ones end.
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


@contextlib.contextmanager
def _no_tokenizer_threads() -> Iterator[None]:
    """TOKENIZERS_PARALLELISM=false while workers fork: the processes are the parallelism, and
    the library would otherwise warn in each worker forked after its thread pool was used."""
    was = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if was is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = was


@dataclass
class _Fallback:
    """The train document with the smallest hash so far: where its tokens are in train.bin."""

    hash: int = 2**64
    offset: int = 0
    length: int = 0


@dataclass
class StreamStats:
    """What `write_shards` wrote, and the most text it held at once."""

    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    jobs: int = 0
    peak_chars_in_flight: int = 0


def _jobs(
    stream: Iterable[list[str]], fraction: float
) -> Iterator[tuple[tuple[list[str], list[str]], np.ndarray, int]]:
    """((train texts, val texts), train hashes, characters) per job of about JOB_CHARS."""
    texts: list[str] = []
    chars = 0
    for batch in stream:
        for text in batch:
            texts.append(text)
            chars += len(text)
            if chars >= JOB_CHARS or len(texts) >= JOB_DOCS:
                yield _split_job(texts, fraction, chars)
                texts, chars = [], 0
    if texts:
        yield _split_job(texts, fraction, chars)


def _split_job(
    texts: list[str], fraction: float, chars: int
) -> tuple[tuple[list[str], list[str]], np.ndarray, int]:
    hashes = hashes_of(texts)  # (D,) uint64
    held = held_out(hashes, fraction)  # (D,) bool
    train = [t for t, h in zip(texts, held, strict=True) if not h]
    val = [t for t, h in zip(texts, held, strict=True) if h]
    return (train, val), hashes[~held], chars


class _StreamWriter:
    """Appends encoded jobs to train.bin / val.bin in job order; tracks the fallback document."""

    def __init__(self, out_dir: Path, progress: Callable[[StreamStats], None]) -> None:
        self.out_dir, self.progress = out_dir, progress
        # Open for the whole stream; close() (in write_shards' finally) closes them.
        self.files = {name: open(out_dir / f"{name}.bin", "wb") for name in SPLITS}  # noqa: SIM115
        self.stats = StreamStats()
        self.fallback = _Fallback()

    def write(self, result: tuple[np.ndarray, ...], train_hashes: np.ndarray) -> None:
        train_ids, train_lengths, val_ids, val_lengths = result
        if len(train_hashes):
            i = int(np.argmin(train_hashes))
            if int(train_hashes[i]) < self.fallback.hash:
                offset = self.stats.tokens["train"] + int(train_lengths[:i].sum())
                self.fallback = _Fallback(int(train_hashes[i]), offset, int(train_lengths[i]))
        parts = (("train", train_ids, train_lengths), ("val", val_ids, val_lengths))
        for name, ids, lengths in parts:
            self.files[name].write(ids.tobytes())
            self.stats.tokens[name] += len(ids)
            self.stats.documents[name] += len(lengths)
        self.progress(self.stats)

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()


def _run_jobs(
    stream: Iterable[list[str]],
    fraction: float,
    encoders: _Encoders,
    writer: _StreamWriter,
    workers: int,
) -> None:
    """Submit the stream's jobs in order, writing each result once it is the oldest; at most
    2 per worker wait at a time."""
    pending: collections.deque[tuple[Any, np.ndarray, int]] = collections.deque()
    in_flight = 0
    for job, train_hashes, chars in _jobs(stream, fraction):
        pending.append((encoders.submit(job), train_hashes, chars))
        in_flight += chars
        writer.stats.jobs += 1
        writer.stats.peak_chars_in_flight = max(writer.stats.peak_chars_in_flight, in_flight)
        while len(pending) > 2 * workers:
            result, hashes, done = pending.popleft()
            writer.write(result.result(), hashes)
            in_flight -= done
    while pending:
        result, hashes, _ = pending.popleft()
        writer.write(result.result(), hashes)


def write_shards(
    stream: Iterable[list[str]],
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    *,
    fraction: float,
    num_proc: int,
    meta: dict[str, Any],
    progress: Callable[[StreamStats], None] = lambda stats: None,
    name: str = "",
) -> StreamStats:
    """Split a stream of documents by hash and tokenise it into out_dir/{train,val}.bin as it
    comes, then write out_dir/meta.json. Parallel over `num_proc` processes (0 = every core);
    the shards are the same for any number. Memory stays bounded: at most two jobs per worker
    are in flight, and tokens go to disk job by job, in stream order.
    """
    vocab = vocab_size_of(tokenizer)
    dtype = dtype_for(vocab)
    bos, eos = special_ids(tokenizer)
    workers = resolve_workers(num_proc)
    out_dir.mkdir(parents=True, exist_ok=True)
    init_args = (tokenizer.backend_tokenizer.to_str(), bos, eos, dtype.name)
    writer = _StreamWriter(out_dir, progress)
    encoders: _Encoders | None = None
    try:
        with _no_tokenizer_threads():
            encoders = _Encoders(workers, init_args)
            _run_jobs(stream, fraction, encoders, writer, workers)
    except concurrent.futures.process.BrokenProcessPool:
        raise DataError(
            f"a tokenising process died (killed, or out of memory?) while preparing "
            f"'{name}'; lower data.num_proc (now {num_proc}) or free memory, and run again"
        ) from None
    finally:
        if encoders is not None:
            encoders.close()
        writer.close()
    stats = writer.stats
    if stats.documents["train"] == 0:
        total = stats.documents["val"]
        raise DataError(
            f"data.source '{name}': all {total} document(s) fell into validation; add "
            "documents or lower data.validation_fraction"
        )
    if fraction > 0 and stats.documents["val"] == 0 and stats.documents["train"] >= 2:
        _hold_out(out_dir, writer.fallback, dtype, stats)
    _write_meta(out_dir, tokenizer, vocab, dtype, bos, eos, stats, meta)
    return stats


def _hold_out(out_dir: Path, doc: _Fallback, dtype: np.dtype, stats: StreamStats) -> None:
    """Move one document from train.bin to val.bin (the rule of `validation_mask` for a corpus
    where no hash falls below the fraction): the file's tail shifts down over it."""
    size = dtype.itemsize
    start, length = doc.offset * size, doc.length * size
    with open(out_dir / "train.bin", "r+b") as fh:
        fh.seek(start)
        (out_dir / "val.bin").write_bytes(fh.read(length))
        read_at, write_at = start + length, start
        while True:
            fh.seek(read_at)
            chunk = fh.read(_MOVE_CHUNK)
            if not chunk:
                break
            fh.seek(write_at)
            fh.write(chunk)
            read_at += len(chunk)
            write_at += len(chunk)
        fh.truncate(write_at)
    for key, step in (("train", -1), ("val", 1)):
        stats.documents[key] += step
        stats.tokens[key] += step * doc.length


_MOVE_CHUNK = 16 << 20


def _write_meta(
    out_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    vocab: int,
    dtype: np.dtype,
    bos: int | None,
    eos: int,
    stats: StreamStats,
    meta: dict[str, Any],
) -> None:
    info = {
        "format": SHARD_FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "bos_id": bos,
        "eos_id": eos,
        "num_tokens": dict(stats.tokens),
        "num_documents": dict(stats.documents),
        **meta,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / "meta.json").write_text(json.dumps(info, indent=2) + "\n", "utf-8")
