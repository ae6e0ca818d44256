"""One writer per run directory: an advisory kernel lock on `run_dir/.lmforge.lock`.

Rank 0 takes the lock in `lmforge.stage.launch`, before anything is written into the run
directory, and holds it for the life of the run; every other rank learns the outcome through a
collective, so a refusal reaches every rank and none waits for the others. The lock is a POSIX
record lock (fcntl): the kernel drops it when the process ends in any way, SIGKILL included, and
NFS carries it to the server, so runs on different nodes exclude each other too.

The file records who holds it (host, pid, start time and a token naming this run). A clean exit
deletes it; a file left by a run that died is stale (nobody holds its lock) and the next run
takes it over, saying so in one line. Ranks on other nodes read the file back and check that it
names this run: a run directory that is not on a filesystem every node shares is refused there.

POSIX locks belong to a process, not to a file descriptor: closing *any* descriptor of the file
in the holding process drops the lock. So this process never opens the lock file twice, and it
refuses a second run directory lock on a directory it already holds itself.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, LmforgeError

LOCK_FILE = ".lmforge.lock"
_REFUSED = (errno.EACCES, errno.EAGAIN)  # what F_SETLK answers when another process holds it
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a run directory's lock."""

    host: str
    pid: int
    started: str  # ISO 8601, UTC
    token: str  # unique per run: ranks on other nodes check the file names their run

    def describe(self) -> str:
        """'host h, pid 12, started 2026-01-01T00:00:00+00:00'."""
        return f"host {self.host}, pid {self.pid}, started {self.started}"

    @staticmethod
    def parse(data: bytes) -> Holder | None:
        """The holder a lock file's bytes record; None when they record none (empty, garbage)."""
        try:
            record = json.loads(data.decode("utf-8"))
            host, pid, started = str(record["host"]), int(record["pid"]), str(record["started"])
            return Holder(host, pid, started, str(record["token"]))
        except (ValueError, TypeError, KeyError, RecursionError):
            return None


def this_process() -> Holder:
    """A holder record for the current process, with a fresh token."""
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return Holder(socket.gethostname(), os.getpid(), now, uuid.uuid4().hex)


def _read_fd(fd: int) -> bytes:
    """The first 4 KiB of an open file (a lock file is one short JSON line)."""
    return os.pread(fd, 4096, 0)


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (a releasing run deletes it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


class RunLock:
    """A run directory lock this process holds; `release` (or process exit) gives it up."""

    def __init__(self, run_dir: Path, fd: int, holder: Holder, made: list[Path]) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.holder = holder
        self._fd = fd
        self._made = made  # directories this run created, deepest first

    @property
    def held(self) -> bool:
        """Whether the lock is still held."""
        return self._fd >= 0

    def release(self) -> None:
        """Delete the lock file (while still holding the lock, so no one takes a file about to
        vanish), then drop the lock; remove the directories the run created if it left them
        empty (a run refused later at start-up leaves nothing behind)."""
        if self._fd < 0:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        except OSError:
            pass  # a read-only or vanished directory: the kernel lock still goes below
        os.close(self._fd)
        self._fd = -1
        _HELD.pop(_key(self.run_dir), None)
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the run wrote something there, keep it


_HELD: dict[str, RunLock] = {}  # run directories this process holds, by resolved path


def _key(run_dir: Path) -> str:
    return str(run_dir.resolve())


def release_all() -> None:
    """Release every run directory lock this process holds (end of a run, and at exit)."""
    for lock in list(_HELD.values()):
        lock.release()


atexit.register(release_all)


def held_lock(run_dir: Path) -> RunLock | None:
    """The lock this process holds on run_dir, if any."""
    return _HELD.get(_key(run_dir))


def refusal(run_dir: Path, holder: Holder | None) -> str:
    """The one line that refuses a run directory another run holds."""
    who = holder.describe() if holder else "its holder has not recorded itself yet"
    return (
        f"run_dir: {run_dir} is in use by another run ({who}; lock file {run_dir / LOCK_FILE}); "
        "wait for that run to end or stop it, or choose another run_dir"
    )


def acquire(run_dir: Path, made: list[Path] | None = None) -> RunLock | None:
    """Take run_dir's lock (run_dir exists) or raise ConfigError naming the run holding it.

    A lock file nobody holds is stale (left by a run that died): it is taken over, with one
    line on stdout. `made` lists directories this run created, removed on release when empty.
    Returns None (after one warning line) on a filesystem without file locks."""
    if held_lock(run_dir) is not None:
        holder = _HELD[_key(run_dir)].holder
        raise ConfigError(refusal(run_dir, holder) + " (this same process holds it)")
    path = run_dir / LOCK_FILE
    for _ in range(20):  # a releasing run may delete the file between our open and our lock
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            data = _read_fd(fd) if e.errno in _REFUSED else b""
            os.close(fd)
            if e.errno in _REFUSED:
                raise ConfigError(refusal(run_dir, Holder.parse(data))) from None
            if e.errno in _UNSUPPORTED:
                print(
                    f"warning: {path}: this filesystem has no file locks ({e.strerror}); "
                    "nothing stops a second run from writing into this run_dir",
                    flush=True,
                )
                return None
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # we locked a file a releasing run had just deleted: try the new one
    else:  # pragma: no cover - would need another run releasing 20 times in a row
        raise ConfigError(refusal(run_dir, None))
    previous = Holder.parse(_read_fd(fd))
    holder = this_process()
    if previous is not None:
        print(
            f"{run_dir}: taking over the lock of a run that ended without releasing it "
            f"({previous.describe()})",
            flush=True,
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(asdict(holder)) + "\n").encode(), 0)
    os.fsync(fd)  # ranks on other nodes read it back
    lock = RunLock(run_dir, fd, holder, list(made or []))
    _HELD[_key(run_dir)] = lock
    return lock


def names_run(run_dir: Path, token: str) -> bool:
    """Whether run_dir's lock file, read from this process, names the run with `token`."""
    try:
        holder = Holder.parse((run_dir / LOCK_FILE).read_bytes()[:4096])
    except OSError:
        return False
    return holder is not None and holder.token == token


def share_outcome(outcome: dict[str, Any], world: int) -> dict[str, Any]:
    """Rank 0's `outcome` on every rank (a broadcast; no-op on one process)."""
    if world == 1:
        return outcome
    import torch.distributed as dist

    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, world: int) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


def error_from(outcome: dict[str, Any]) -> LmforgeError:
    """The error rank 0 met, rebuilt with its own class on this rank."""
    from lmforge import errors

    cls = getattr(errors, str(outcome.get("kind", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, LmforgeError)):
        cls = LmforgeError
    return cls(str(outcome["error"]))


@dataclass
class Claim:
    """Rank 0's attempt to make a run directory this run's (`claim_run_dir`), to be settled on
    every rank (`settle`)."""

    run_dir: Path
    rank: int
    lock: RunLock | None = None
    failure: BaseException | None = None  # rank 0's, raised by settle
    outcome: dict[str, Any] | None = None  # what rank 0 tells the others

    def settle(self, world: int) -> RunLock | None:
        """Raise rank 0's failure on every rank, or return its lock (None on other ranks).

        With several processes this is collective (the process group must be up): rank 0's
        outcome is broadcast, so a refusal reaches every rank and none waits for the others;
        then every rank reads the lock file back, and a rank that does not find this run's
        token there (a node that does not share run_dir's filesystem) fails it everywhere.
        A single process needs no process group: settle it before starting one."""
        if world == 1:
            if self.failure is not None:
                raise self.failure
            return self.lock
        outcome = share_outcome(self.outcome or {}, world)
        if "error" in outcome:
            raise self.failure if self.failure is not None else error_from(outcome)
        token = outcome["token"]
        sees = self.rank == 0 or token is None or names_run(self.run_dir, token)
        views = gather((socket.gethostname(), sees), world)
        blind = [(r, host) for r, (host, ok) in enumerate(views) if not ok]
        if blind:
            if self.lock is not None:
                self.lock.release()
            r, host = blind[0]
            raise ConfigError(
                f"run_dir: {self.run_dir} on host {host} (rank {r}) does not hold the lock file "
                f"rank 0 wrote there on host {outcome['host']}: every process must see the same "
                "run_dir; put it on a filesystem all nodes share"
            )
        return self.lock


def claim_run_dir(run_dir: Path, allow_foreign: bool, rank: int) -> Claim:
    """On rank 0: check that the run may write into run_dir (lmforge.rundir.prepare_run_dir),
    create it and take its lock, keeping any failure for `Claim.settle`, which every rank
    calls. Other ranks do nothing here."""
    from lmforge.rundir import prepare_run_dir

    claim = Claim(run_dir, rank)
    if rank != 0:
        return claim
    try:
        claim.lock = acquire(run_dir, prepare_run_dir(run_dir, allow_foreign))
        token = claim.lock.holder.token if claim.lock else None
        claim.outcome = {"token": token, "host": socket.gethostname()}
    except Exception as e:  # every rank must hear of any failure, or they wait forever
        claim.failure = e
        claim.outcome = {"kind": type(e).__name__, "error": str(e)}
    return claim
