"""A run directory's checkpoints over time: listing, leftovers of interrupted saves, retention,
and the free-space check before a save.

Checkpoints are `step-NNNNNN/` directories; `latest` names the newest complete one. A save works
in `.step-NNNNNN.partial/` and renames it when complete (lmforge.checkpoint), so anything hidden
is either a save that was interrupted or a directory being deleted: never a checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from lmforge.checkpoint import LATEST_FILE, META_FILE, read_json
from lmforge.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVERS = (".*.partial", ".*.old", ".*.deleting", f".{LATEST_FILE}.tmp")


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete `step-N` checkpoint in run_dir, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / META_FILE).is_file() and (path / "config.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_name(run_dir: Path) -> str | None:
    """The checkpoint name in run_dir/latest, if any."""
    file = run_dir / LATEST_FILE
    return file.read_text().strip() if file.is_file() else None


def rollback_target(run_dir: Path, before_step: int) -> Path | None:
    """The newest checkpoint saved before step `before_step`; else the newest there is (a
    skipped step changes nothing, so a checkpoint saved during the trouble holds the state from
    before it); None when run_dir has no checkpoint."""
    found = list_checkpoints(run_dir)
    earlier = [path for step, path in found if step < before_step]
    if earlier:
        return earlier[-1]
    return found[-1][1] if found else None


def clean_leftovers(run_dir: Path) -> list[str]:
    """Delete what interrupted saves and deletions left in run_dir (and its subdirectories one
    level down, e.g. PPO's critic/); returns the names removed."""
    removed = []
    for folder in [run_dir, *[p for p in run_dir.iterdir() if p.is_dir()]]:
        if folder.name.startswith("."):
            continue
        for pattern in _LEFTOVERS:
            for path in folder.glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(str(path.relative_to(run_dir)))
    return sorted(removed)


def apply_retention(run_dir: Path, keep_last: int, keep_every: int, newest: str) -> list[str]:
    """Delete step checkpoints beyond the `keep_last` newest, except those whose step is a
    multiple of `keep_every`, the one `latest` names and `newest` (the one just written).
    keep_last 0 keeps everything. Each is renamed to a hidden name before it is deleted, so a
    crash never leaves half a checkpoint under a real name. Returns the names deleted."""
    if keep_last <= 0:
        return []
    found = list_checkpoints(run_dir)
    keep = {path.name for _, path in found[-keep_last:]}
    keep |= {path.name for step, path in found if keep_every > 0 and step % keep_every == 0}
    keep |= {newest, latest_name(run_dir) or newest}
    deleted = []
    for _, path in found:
        if path.name in keep:
            continue
        doomed = path.parent / f".{path.name}.deleting"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(path.name)
    return deleted


def checkpoint_bytes(path: Path) -> int:
    """Bytes of a checkpoint as its manifest records them (0 if it cannot be read)."""
    try:
        meta = read_json(path / META_FILE)
    except CheckpointError:
        return 0
    files = meta.get("files", {}) if isinstance(meta, dict) else {}
    return (
        sum(int(info.get("size", 0)) for info in files.values()) + (path / META_FILE).stat().st_size
    )


def format_bytes(n: float) -> str:
    """1.5 GB, 320 MB, 12 kB, 80 B."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def space_problem(directory: Path, need: int, margin: int) -> str | None:
    """Why a save of about `need` bytes into `directory` should not start (None if it may):
    it must leave `margin` bytes free."""
    folder = directory
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free - need >= margin:
        return None
    extra = f" plus train.min_free_bytes={format_bytes(margin)}" if margin else ""
    return (
        f"{directory}: not enough disk space for the next checkpoint: it needs about "
        f"{format_bytes(need)} ({need} bytes){extra} but {format_bytes(free)} ({free} bytes) are "
        "free; free some space (or keep fewer checkpoints: train.keep_last) and resume"
    )
