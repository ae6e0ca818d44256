"""Where a corpus comes from: resolve `data.source` to files (or the builtin / a hub name).

Also the cheap checks that read every local file once anyway (for the cache key): a file that is
binary, not UTF-8 or not parquet fails here with its name, before `datasets` sees it.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from lmforge.data.config import DataConfig
from lmforge.errors import DataError

# File extension -> the `datasets` packaged builder that reads it.
FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_KINDS = ", ".join(FORMATS)
_GLOB_CHARS = set("*?[")
_CHUNK = 1 << 20


class Digest(Protocol):
    """What check_file needs of a hashlib object."""

    def update(self, data: bytes, /) -> None: ...


@dataclass(frozen=True)
class Source:
    """A resolved corpus source: kind 'builtin', 'files' (with a builder) or 'hub'."""

    kind: str
    name: str  # what the user wrote
    files: tuple[Path, ...] = ()
    builder: str = ""  # "text", "json" or "parquet" for kind "files"
    fingerprint: str = field(default="", compare=False)

    def describe(self) -> str:
        """One line for meta.json and logs."""
        if self.kind == "files":
            return f"{self.name} ({len(self.files)} {self.builder} file(s))"
        return self.name if self.kind == "builtin" else f"hub:{self.name}"


def _looks_local(source: str) -> bool:
    """A source that names a path (not a hub id), even if nothing is there."""
    return (
        bool(_GLOB_CHARS & set(source))
        or source.startswith((".", "/", "~"))
        or Path(source).suffix.lower() in FORMATS
        or Path(source).expanduser().exists()
        or source.count("/") > 1
    )


def _expand(source: str, skip: Path) -> list[Path]:
    """The data files a local source names: a file, every data file under a directory, or a glob.

    Files under `skip` (the cache directory: its tokenizer.json is no corpus) are left out.
    """
    path = Path(source).expanduser()
    if _GLOB_CHARS & set(source):
        matches = [Path(p) for p in glob.glob(str(path), recursive=True)]
        files = sorted(
            p
            for p in matches
            if p.is_file() and p.suffix.lower() in FORMATS and not p.resolve().is_relative_to(skip)
        )
        if not files:
            raise DataError(f"data.source '{source}': no {_KINDS} files match this pattern")
        return files
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in FORMATS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and not p.resolve().is_relative_to(skip)
        )
        if not files:
            raise DataError(f"data.source '{source}': directory has no {_KINDS} files")
        return files
    if not path.exists():
        raise DataError(f"data.source '{source}': no such file or directory; check the path")
    if path.suffix.lower() not in FORMATS:
        raise DataError(
            f"data.source '{source}': unsupported file type '{path.suffix}'; use one of {_KINDS}"
        )
    return [path]


class _LineLength:
    """The longest line of a text file, fed chunk by chunk; raises DataError past `limit`."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path, self.limit = path, limit
        self.current = 0  # bytes of the line in progress
        self.newlines = 0

    def feed(self, chunk: bytes) -> None:
        parts = chunk.split(b"\n")
        for i, part in enumerate(parts):
            length = (self.current if i == 0 else 0) + len(part)
            if length > self.limit:
                raise DataError(
                    f"{self.path} line {self.newlines + i + 1}: longer than "
                    f"data.max_record_bytes={self.limit} bytes; split it into smaller records "
                    "(one document or chat per line) or raise the limit"
                )
        self.current = (self.current if len(parts) == 1 else 0) + len(parts[-1])
        self.newlines += len(parts) - 1


# Deepest nesting of brackets a JSON record may have. Real records nest a few levels (a chat:
# object, list of messages, message); pyarrow's JSON reader (what `datasets` uses) crashes the
# process on a few thousand, and Python's json module stops near its recursion limit (1000).
MAX_JSON_DEPTH = 500


def json_depths(data: bytes, per_line: bool, carry: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(depth after each bracket, its line index in `data`) for the `[`/`{`/`]`/`}` of JSON
    text outside strings. Strings do not span lines in JSON, so the inside-a-string state
    restarts at every line; `per_line` restarts the depth too (JSON Lines), otherwise it carries
    on from `carry` (one document over many lines). Both (n,) int64."""
    data = data.replace(b"\\\\", b"").replace(b'\\"', b"")  # escapes: no quote, no bracket
    a = np.frombuffer(data, dtype=np.uint8)  # (N,)
    newline = a == 0x0A  # (N,)
    at = np.flatnonzero((a == 0x5B) | (a == 0x7B) | (a == 0x5D) | (a == 0x7D))  # (n,)
    if at.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lines = np.cumsum(newline, dtype=np.int64)[at]  # (n,) newlines before each bracket
    quotes = np.cumsum(a == 0x22, dtype=np.int64)  # (N,) quotes up to each byte
    line_quotes = np.concatenate([[0], quotes[np.flatnonzero(newline)]])  # before each line
    inside = (quotes[at] - line_quotes[lines]) % 2 == 1  # (n,) in a string of its line
    step = np.where((a[at] == 0x5B) | (a[at] == 0x7B), 1, -1)  # (n,)
    step[inside] = 0
    depth = np.cumsum(step) + carry  # (n,)
    if per_line:
        first = np.concatenate([[True], lines[1:] != lines[:-1]])  # (n,) a line's first bracket
        start = (depth - step)[first]  # depth before each line
        depth = depth - start[np.cumsum(first) - 1]
    return depth, lines


def _most_opened(data: bytes) -> int:
    """The most `[` and `{` one line of `data` holds, in or out of strings: a bound on the
    nesting depth of its JSON records, cheap to count."""
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return MAX_JSON_DEPTH  # no line can hold more: skip the per-line count
    a = np.frombuffer(data, dtype=np.uint8)  # (N,)
    opens = np.flatnonzero((a == 0x5B) | (a == 0x7B))  # (n,)
    line_of = np.searchsorted(np.flatnonzero(a == 0x0A), opens)  # (n,) line of each
    return int(np.bincount(line_of).max())


class _Nesting:
    """The nesting depth of a JSON file's records, fed chunk by chunk; raises DataError past
    MAX_JSON_DEPTH naming the line. Complete lines only are looked at (a line is at most
    max_record_bytes long); a JSON Lines chunk with too few brackets to be deep is skipped."""

    def __init__(self, path: Path, per_line: bool) -> None:
        self.path, self.per_line = path, per_line
        self.pending = b""  # the line in progress
        self.lines = 0  # complete lines before `pending`
        self.depth = 0  # carried depth (one document over many lines)

    def feed(self, chunk: bytes, final: bool = False) -> None:
        data = self.pending + chunk
        end = len(data) if final else data.rfind(b"\n") + 1
        self.pending, data = data[end:], data[:end]
        if not data:
            return
        if not self.per_line or _most_opened(data) > MAX_JSON_DEPTH:
            depth, lines = json_depths(data, self.per_line, self.depth)
            over = np.flatnonzero(depth > MAX_JSON_DEPTH)
            if over.size:
                raise DataError(
                    f"{self.path} line {self.lines + int(lines[over[0]]) + 1}: JSON nested more "
                    f"than {MAX_JSON_DEPTH} levels deep; flatten that record"
                )
            if not self.per_line and depth.size:
                self.depth = int(depth[-1])
        self.lines += data.count(b"\n")


def check_file(path: Path, digest: Digest, max_record_bytes: int = 0) -> None:
    """Feed the file's bytes to digest, raising DataError if it is binary or not UTF-8 / parquet,
    or (max_record_bytes > 0) has a line longer than that."""
    text = path.suffix.lower() != ".parquet"
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = _LineLength(path, max_record_bytes) if text and max_record_bytes > 0 else None
    starts = {".jsonl": b"{", ".json": b"{["}.get(path.suffix.lower())
    nesting = _Nesting(path, path.suffix.lower() == ".jsonl") if starts else None
    offset = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            if lines is not None:
                lines.feed(chunk)
            if nesting is not None:
                nesting.feed(chunk)
            if starts and chunk.strip():  # datasets' JSON reader can crash on a bare value
                first = chunk.lstrip()[:1]
                if first not in starts:
                    raise DataError(
                        f"{path}: the first record is not a JSON object (it starts with "
                        f"{first.decode('latin-1')!r}); write one object per line, e.g. "
                        '{"text": "..."}'
                    )
                starts = None
            if not text:
                if offset == 0 and not chunk.startswith(b"PAR1"):
                    raise DataError(f"{path}: not a parquet file (bad magic bytes); re-export it")
            elif b"\x00" in chunk:
                where = offset + chunk.index(b"\x00")
                raise DataError(
                    f"{path}: binary data (a NUL byte at offset {where}), not text; remove it "
                    "from data.source"
                )
            else:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"{path}: not UTF-8 text (byte 0x{chunk[err.start]:02x} at offset "
                        f"{offset + err.start}); convert it to UTF-8 or remove it"
                    ) from None
            offset += len(chunk)
    if offset == 0:
        raise DataError(f"{path}: the file is empty; add documents or remove it from data.source")
    if nesting is not None:
        nesting.feed(b"", final=True)
    if text:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(
                f"{path}: not UTF-8 text (an incomplete character at the end); convert it"
            ) from None


def resolve_source(cfg: DataConfig, builtin_hash: str = "") -> Source:
    """Resolve cfg.source and fingerprint it: the part of the cache key that says what was read.

    Local files are fingerprinted by path, size, mtime and a sha256 of their content (and checked
    on the way, see `check_file`); a hub dataset by name, config and split (its files are the
    hub's to version); the builtin corpus by `builtin_hash`, the hash of its text.
    """
    source = cfg.source.strip()
    if source == "builtin":
        return Source("builtin", "builtin", fingerprint=f"builtin|{builtin_hash}")
    if not _looks_local(source):
        key = f"hub|{source}|{cfg.hub_config}|{cfg.hub_split}"
        return Source("hub", source, fingerprint=key)
    files = _expand(source, Path(cfg.cache_dir).expanduser().resolve())
    kinds = sorted({FORMATS[p.suffix.lower()] for p in files})
    if len(kinds) > 1:
        found = sorted({p.suffix.lower() for p in files})
        raise DataError(
            f"data.source '{source}' mixes {' and '.join(found)} files; keep one format per "
            "source (or select one with a glob such as dir/*.jsonl)"
        )
    digest = hashlib.sha256(b"files")
    for path in files:
        st = path.stat()
        digest.update(f"|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
        check_file(path, digest, cfg.max_record_bytes)
    return Source("files", source, tuple(files), kinds[0], digest.hexdigest())
