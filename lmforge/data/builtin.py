"""The embedded default corpus: English prose that ships with every Python installation.

Three sources, read without importing any module but `pydoc_data.topics` (a plain dict):

- the help topics of `pydoc_data.topics` (the language reference behind `help("FOR")`),
- the docstrings of the standard library, collected by parsing its `.py` files with `ast`, and
- its blocks of consecutive `#` comment lines (the why behind the code, written as prose).

Test suites, site-packages and code that carries no prose of its own (IDLE, lib2to3, codec
tables, the turtle demos, bundled wheels) are skipped. Files are read in sorted path order; each
text of at least MIN_CHARS characters is one document, cleaned with `inspect.cleandoc` and
de-duplicated, so the corpus is the same on every run of the same Python (about 2 MB for 3.11).
Collecting it parses ~450 files (seconds), so the result is also cached on disk, keyed by the
Python version and the size and mtime of every file read.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
import sys
import sysconfig
from pathlib import Path

from lmforge.data.atomic import write_text_atomic

FORMAT = 1  # bump when the collection rules change: it invalidates cached corpora
MIN_CHARS = 200  # shorter docstrings are mostly "Return x." one-liners
# Directory names whose files add no prose (tests) or noise (generated tables, vendored code).
SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "encodings",
        "pydoc_data",  # read through pydoc_data.topics instead
        "__pycache__",
    }
)


def stdlib_dir() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files that carry prose, sorted by relative path."""
    root = stdlib_dir() if root is None else root
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith((".", "config-"))]
        found += [Path(folder, f) for f in files if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(source: bytes) -> list[str]:
    """Module, class and function docstrings of one file, in source order (cleaned)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: null bytes; both only in odd fixtures
        return []
    defs = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes: list[ast.AST] = [tree, *(n for n in ast.walk(tree) if isinstance(n, defs))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    docs = [ast.get_docstring(n, clean=True) for n in nodes]  # type: ignore[arg-type]
    return [doc for doc in docs if doc]  # clean=True applies inspect.cleandoc


def _comment_blocks(source: bytes) -> list[str]:
    """Runs of consecutive full-line `#` comments, without the `#`, one text per run."""
    blocks: list[str] = []
    run: list[str] = []
    for line in [*source.decode("utf-8", "replace").splitlines(), ""]:
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith(("#!", "# -*-")):
            run.append(stripped.lstrip("#").strip())
        elif run:
            blocks.append("\n".join(run))
            run = []
    return blocks


def _topics() -> list[str]:
    """The help topics of pydoc_data.topics, sorted by topic name."""
    from pydoc_data.topics import topics  # a dict literal of str -> str

    return [inspect.cleandoc(topics[name]) for name in sorted(topics)]


def collect_builtin(min_chars: int = MIN_CHARS) -> list[str]:
    """Collect the builtin corpus from the standard library (slow: parses every file)."""
    texts = _topics()
    for path in stdlib_files():
        try:
            source = path.read_bytes()
        except OSError:
            continue
        texts += _docstrings(source) + _comment_blocks(source)
    seen: set[str] = set()
    docs = []
    for text in texts:
        text = text.strip()
        if len(text) >= min_chars and text not in seen:
            seen.add(text)
            docs.append(text)
    return docs


def _listing_key() -> str:
    """A hash of everything the builtin corpus is collected from (cheap: stats, no reads)."""
    digest = hashlib.sha256(f"{FORMAT}|{MIN_CHARS}|{sys.version}|{stdlib_dir()}".encode())
    import pydoc_data.topics as topics_module

    for path in [Path(str(topics_module.__file__)), *stdlib_files()]:
        try:
            st = path.stat()
        except OSError:
            continue
        digest.update(f"|{path}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


@functools.cache
def _load_builtin(cache_dir: str) -> tuple[str, ...]:
    cached = Path(cache_dir) / "builtin" / f"{_listing_key()}.json"
    if cached.is_file():
        try:
            docs = json.loads(cached.read_text("utf-8"))
            if isinstance(docs, list) and all(isinstance(d, str) for d in docs):
                return tuple(docs)
        except (OSError, ValueError):
            pass  # unreadable: collect again and overwrite it
    docs = collect_builtin()
    write_text_atomic(cached, json.dumps(docs, ensure_ascii=False))
    return tuple(docs)


def builtin_documents(cache_dir: str | Path = ".cache/lmforge") -> tuple[str, ...]:
    """Every document of the builtin corpus in a fixed order, cached on disk and in memory."""
    return _load_builtin(str(Path(cache_dir).expanduser().resolve()))


def text_fingerprint(texts: tuple[str, ...] | list[str]) -> str:
    """sha256 of a sequence of texts (length-prefixed, so boundaries count)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()
