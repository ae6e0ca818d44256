"""Small filesystem helpers: write-then-rename, so no reader ever sees a half-written output."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

from lmforge.config import file_mode
from lmforge.errors import DataError


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, file_mode())  # mkstemp makes it private; give it what open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_workspace(cache_root: Path) -> Path:
    """A fresh private build directory under cache_root/.tmp (same filesystem: renames work).

    Its name carries host and pid, so a workspace left by a crashed process of this host is
    deleted here (the rename that publishes a result never happened, so nothing refers to it).
    """
    tmp_root = cache_root / ".tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace("-", "_")
    for old in tmp_root.glob(f"build-{host}-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    work = tmp_root / f"build-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    return work


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def publish(built: Path, final: Path) -> None:
    """Rename the complete directory `built` to `final`; if another process won, keep theirs."""
    try:
        os.rename(built, final)
    except OSError:
        if not (final / "meta.json").is_file() and not (final / "tokenizer.json").is_file():
            raise
        shutil.rmtree(built, ignore_errors=True)  # same inputs, same content: theirs will do


def wait_for(marker: Path, deadline: float, what: str) -> None:
    """Poll until `marker` exists (rank 0 has published it), or raise DataError at deadline."""
    delay = 0.05
    while not marker.exists():
        if time.monotonic() >= deadline:
            raise DataError(
                f"timed out waiting for rank 0 to build {what} at {marker.parent}; check rank 0's "
                "log for its error, or raise the timeout if building is just slow"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
