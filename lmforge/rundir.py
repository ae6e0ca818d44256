"""A run directory's checkpoints over time: listing, leftovers of interrupted saves, retention,
the free-space check before a save, and the checks before a run may write into it at all.

Checkpoints are `step-NNNNNN/` directories; `latest` names the newest complete one. A save works
in `.step-NNNNNN.partial/` and renames it when complete (lmforge.checkpoint); an overwritten
checkpoint waits as `.step-NNNNNN.old`, a deleted one as `.step-NNNNNN.deleting`. Only those exact
names (and the temporary files of `latest` and `config.yaml`) are ever cleaned up, only in the
run directory itself and in the directories of a run's other engines (PPO's `critic/`): a run
directory may sit among the user's own files, and those are never touched.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from lmforge.checkpoint import LATEST_FILE, META_FILE, POINTER_FILES, read_json, read_latest
from lmforge.errors import CheckpointError, ConfigError

STEP_DIR = re.compile(r"^step-(\d+)$")
# What lmforge itself leaves behind when a save, a deletion or a config write is interrupted:
# `.step-N.partial` (lmforge.checkpoint.partial_dir), `.step-N.old` (commit's overwrite),
# `.step-N.deleting` (apply_retention), `.latest.tmp` and `.best.tmp` (write_pointer) and
# config.yaml's temporary file (lmforge.config.dump_config: mkstemp's 8 random characters).
LEFTOVER = re.compile(
    r"^\.(step-\d+\.(partial|old|deleting)|("
    + "|".join(re.escape(name) for name in POINTER_FILES)
    + r")\.tmp|config\.yaml\.[a-z0-9_]{8}\.tmp)$"
)
# Directories of a run's other engines inside its run directory (finetune/ppo.py's critic).
ENGINE_SUBDIRS = ("critic",)
# A run directory lmforge made holds one of these (besides step-N/ checkpoints).
CONFIG_FILE = "config.yaml"
LOCK_NAME = ".lmforge.lock"  # lmforge.runlock.LOCK_FILE (that module stays free of torch)


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
    """The checkpoint name in run_dir/latest, if any (a malformed file is a CheckpointError:
    see lmforge.checkpoint.read_latest)."""
    return read_latest(run_dir)


def rollback_target(run_dir: Path, before_step: int) -> Path | None:
    """The newest checkpoint saved before step `before_step`; else the newest there is (a
    skipped step changes nothing, so a checkpoint saved during the trouble holds the state from
    before it); None when run_dir has no checkpoint."""
    found = list_checkpoints(run_dir)
    earlier = [path for step, path in found if step < before_step]
    if earlier:
        return earlier[-1]
    return found[-1][1] if found else None


def leftovers(run_dir: Path) -> list[Path]:
    """What interrupted saves, deletions and config writes of lmforge left in run_dir and in its
    engines' subdirectories (`critic/`): only the exact names lmforge writes (`LEFTOVER`)."""
    found = []
    for folder in [run_dir, *(run_dir / sub for sub in ENGINE_SUBDIRS)]:
        if folder.is_dir() and not folder.is_symlink():
            found += [p for p in folder.iterdir() if LEFTOVER.match(p.name)]
    return sorted(found)


def clean_leftovers(run_dir: Path) -> list[str]:
    """Delete `leftovers(run_dir)`; returns their names relative to run_dir. Nothing else in
    run_dir or below it is touched, whatever its name."""
    removed = []
    for path in leftovers(run_dir):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(str(path.relative_to(run_dir)))
    return removed


def _our_config(path: Path) -> bool:
    """Whether config.yaml is one lmforge wrote: a YAML mapping with a top-level run_dir key
    (every stage's config has one). Only the first 64 KiB are read."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return any(line.startswith(b"run_dir:") for line in head.splitlines())


def made_by_lmforge(run_dir: Path) -> bool:
    """Whether run_dir holds what only an lmforge run writes: `latest`, a `step-N/` checkpoint,
    a config.yaml with a top-level run_dir key, a run directory lock or an interrupted save."""
    for path in run_dir.iterdir():
        name = path.name
        if name in (LATEST_FILE, LOCK_NAME) or LEFTOVER.match(name):
            return True
        if STEP_DIR.match(name) and path.is_dir():
            return True
        if name == CONFIG_FILE and _our_config(path):
            return True
    return False


def run_dir_path(text: str | None) -> Path:
    """The configured run_dir as a path; an empty one (it would mean the current directory) is
    a ConfigError."""
    if text is None or not str(text).strip():
        raise ConfigError(
            "run_dir: empty; give the directory for this run's checkpoints and metrics "
            "(e.g. --run_dir=runs/my-run)"
        )
    return Path(str(text))


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def prepare_run_dir(run_dir: Path, allow_foreign: bool) -> list[Path]:
    """Check that a run may write into run_dir, then create it if needed, before anything is
    written there. Returns the directories created (deepest first), so a run refused later at
    start-up can remove them again. Raises ConfigError in one line when run_dir is a file, is
    not writable, or exists, is not empty and was not made by lmforge (unless
    `allow_foreign`, the config's allow_foreign_run_dir)."""
    key = "run_dir"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{key}: {run_dir} is a file, not a directory; choose a directory")
    if run_dir.is_dir():
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise ConfigError(
                f"{key}: {run_dir} is read-only (no permission to write in it); make it "
                "writable, or choose another run_dir (init_from can start from its checkpoint)"
            )
        try:
            foreign = any(run_dir.iterdir()) and not made_by_lmforge(run_dir)
        except OSError as e:
            raise ConfigError(f"{key}: {run_dir} cannot be listed ({_reason(e)})") from None
        if foreign and not allow_foreign:
            raise ConfigError(
                f"{key}: {run_dir} is not empty and was not made by lmforge (no config.yaml, "
                "latest or step-* checkpoint in it); choose a new or empty directory, or set "
                "allow_foreign_run_dir: true to add the run to it (lmforge deletes nothing of "
                "yours)"
            )
        if foreign and (run_dir / CONFIG_FILE).exists():
            raise ConfigError(
                f"{key}: {run_dir / CONFIG_FILE} is not an lmforge config and the run would "
                "replace it; move it away or choose another run_dir"
            )
        return []
    missing = [run_dir, *(p for p in run_dir.parents if not p.exists())]
    try:
        run_dir.mkdir(parents=True)
    except OSError as e:
        where = missing[-1].parent
        raise ConfigError(
            f"{key}: cannot create {run_dir} ({_reason(e)} in {where}); choose a directory "
            "you can write in"
        ) from None
    return missing


def apply_retention(
    run_dir: Path, keep_last: int, keep_every: int, newest: str, also_keep: tuple[str, ...] = ()
) -> list[str]:
    """Delete step checkpoints beyond the `keep_last` newest, except those whose step is a
    multiple of `keep_every`, the one `latest` names, `newest` (the one just written) and
    `also_keep` (the one `best` names). keep_last 0 keeps everything. Each is renamed to a
    hidden name before it is deleted, so a crash never leaves half a checkpoint under a real
    name. Returns the names deleted."""
    if keep_last <= 0:
        return []
    found = list_checkpoints(run_dir)
    keep = {path.name for _, path in found[-keep_last:]}
    keep |= {path.name for step, path in found if keep_every > 0 and step % keep_every == 0}
    keep |= {newest, latest_name(run_dir) or newest, *also_keep}
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
